import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "inductor"))


def make_image_folder(root: Path, classes: int = 3, per_class: int = 4, size=(64, 48),
                      corrupt: int = 0, seed: int = 0) -> Path:
    """A tiny ImageFolder of real JPEG files: textured images, one base colour per class.

    ``corrupt`` files named ``broken_*.jpg`` hold bytes that are not a JPEG (in the first class).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for i in range(per_class):
            noise = rng.integers(-40, 40, size=(size[1], size[0], 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i:03d}.jpg", quality=90)
    for i in range(corrupt):
        (root / "class_00" / f"broken_{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 3)
    return root


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; tests that build Accelerators start from none."""
    yield
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")
