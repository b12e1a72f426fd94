import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "inductor"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: N tests at once, one compute thread each (and in what they start), so that N
    # workers on N cores never fight over OpenMP threads
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_configure(config):
    """pytest -n 2 hands a worker its next test when it starts one (xdist's --maxschedchunk 1, unless
    given): its default, consecutive chunks of a quarter of each worker's share, would give one
    worker every long test at the head of the order below."""
    if getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(items):
    """The longest tests first (``slow(minutes=N)``, plain ``slow`` about half a minute), the order kept
    otherwise: the two workers then end together on short tests instead of one waiting minutes on a
    long one collected last. Equal weights keep a module's tests together, so its module fixtures (the
    learning tests' floor) are built once per worker."""
    def minutes(item):
        return max((m.kwargs.get("minutes", 0.5) for m in item.iter_markers("slow")), default=0)
    items.sort(key=minutes, reverse=True)


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


MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)  # DataConfig's defaults
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
# 64 colours 60 apart per channel: far beyond JPEG error, so a colour names its image.
PALETTE = [np.array(c) for c in itertools.product((30, 90, 150, 210), repeat=3)]


def colour_folder(root, counts, distinct=True):
    """An ImageFolder of constant-colour JPEGs (image k has colour PALETTE[k]); counts per class."""
    k = 0
    for c, n in enumerate(counts):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n):
            pixels = np.full((40, 52, 3), PALETTE[k if distinct else 25], np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.jpg", quality=95)
            k += 1
    return root


def rgb(view):
    """Un-normalised 0-255 values of a [B,3,H,W] batch."""
    return (view.float() * STD + MEAN) * 255


def identities(view):
    """Palette index of each image of a constant-colour batch."""
    means = rgb(view).mean(dim=(2, 3)).numpy()
    ids = [int(np.argmin([np.abs(m - p).max() for p in PALETTE])) for m in means]
    assert all(np.abs(m - PALETTE[i]).max() < 6 for m, i in zip(means, ids))
    return ids


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state; tests that build Accelerators start from none."""
    yield
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def one_thread():
    """Many small matmuls (critics, tiny models) run no faster on two threads; one leaves the other
    core to whatever else the machine runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")
