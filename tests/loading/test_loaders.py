"""The loader contract shared by every backend: a seeded subset, and evaluation reads of either split."""
import numpy as np
import pytest

import torch

from conftest import PALETTE, colour_folder, identities, rgb
from loaders import DataConfig, LoaderError, LoaderRequest, build_loader, subset_indices

BACKENDS = ["torchvision", "dali", "ffcv"]


def test_subset_indices_are_seeded_sorted_and_bounded():
    a = subset_indices(100, 30, seed=3)
    assert len(a) == 30 and len(set(a.tolist())) == 30 and list(a) == sorted(a)
    assert np.array_equal(a, subset_indices(100, 30, seed=3))
    assert not np.array_equal(a, subset_indices(100, 30, seed=4))
    assert np.array_equal(subset_indices(10, None, 0), np.arange(10))
    assert np.array_equal(subset_indices(10, 50, 0), np.arange(10))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same 20 constant-colour images as a folder and (if ffcv is installed) as a .beton file."""
    root = colour_folder(tmp_path_factory.mktemp("subset") / "images", [5, 5, 5, 5])
    paths = {"torchvision": root, "dali": root}
    try:
        from loaders.ffcv_convert import convert
    except ImportError:
        return {**paths, "ffcv": None}  # the ffcv tests skip themselves
    beton = root.parent / "images.beton"
    convert(root, beton, write_mode="raw", num_workers=1)
    return {**paths, "ffcv": beton}


def read(backend, source, split, subset, rank=0, world_size=1):
    pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}.get(backend, "torch"))
    cfg = DataConfig(train=source, val=source, image_size=16, val_resize_ratio=1.0,
                     num_workers=1 if backend != "torchvision" else 0)
    loader = build_loader(backend, cfg, LoaderRequest(split=split, batch_size=3, augment="center", subset=subset,
                                                      rank=rank, world_size=world_size, seed=5))
    return [i for views, _ in loader for i in identities(views[0])], loader.num_samples


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["val", "train"])
def test_a_subset_is_read_whole_once_across_processes(sources, backend, split):
    """7 of 20 images, 2 processes, batches of 3: every chosen image exactly once, partial batches kept,
    whichever split a center-cropped (evaluation) read is of."""
    expected = subset_indices(20, 7, seed=5).tolist()
    seen, counts = [], 0
    for rank in range(2):
        ids, num_samples = read(backend, sources[backend], split, 7, rank, 2)
        seen += ids
        counts += num_samples
    assert sorted(seen) == expected and counts == 7
    assert sorted(read(backend, sources[backend], split, None)[0]) == list(range(20))


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_view_gets_its_own_augmentation(sources, backend):
    """augment=("basic", "contrastive"): on constant-colour images only colour ops move a colour, so
    view 0 keeps every colour and view 1 (jitter p=0.8, grayscale p=0.2) moves some."""
    pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}.get(backend, "torch"))
    cfg = DataConfig(train=sources[backend], image_size=16, num_workers=1 if backend != "torchvision" else 0)
    loader = build_loader(backend, cfg, LoaderRequest(split="train", batch_size=20, augment=("basic", "contrastive"),
                                                      num_views=2, seed=3))
    (plain, coloured), labels = next(iter(loader))
    originals = identities(plain)  # asserts every colour of view 0 is its image's own
    moved = [(m - torch.tensor(PALETTE[i], dtype=torch.float32)).abs().max() > 8
             for m, i in zip(rgb(coloured).mean(dim=(2, 3)), originals)]
    assert 4 <= sum(moved) <= 20


def test_a_per_view_augmentation_needs_one_entry_per_view():
    with pytest.raises(ValueError, match="one training augmentation per view"):
        LoaderRequest(split="train", batch_size=2, augment=("basic",), num_views=2)
    with pytest.raises(ValueError, match="one training augmentation per view"):
        LoaderRequest(split="train", batch_size=2, augment=("basic", "center"), num_views=2)


def _roughness(views: torch.Tensor) -> torch.Tensor:
    """Per image: mean |pixel - right neighbour| / std, unchanged by brightness and contrast, lowered by a blur."""
    step = (views[..., 1:] - views[..., :-1]).abs().mean(dim=(1, 2, 3))
    return step / views.std(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("noise") / "images"
    gen = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(12):
            pixels = gen.integers(0, 256, (40, 40, 3), dtype=np.uint8).repeat(2, 0).repeat(2, 1)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.jpg", quality=95)
    return root


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_simclr_augmentation_blurs_about_half_the_views(noise_folder, backend):
    """SimCLR's blur (p=0.5, window 10% of 80 px = 9, sigma 0.1-2): on noise images the blurred views
    are much smoother than any unblurred one; the contrastive augmentation (no blur) never is."""
    pytest.importorskip({"dali": "nvidia.dali"}.get(backend, "torch"))
    torch.manual_seed(0)  # num_workers 0: torchvision's coin flips come from this process's RNG, whatever ran before
    rough = {}
    for augment in ("contrastive", "simclr"):
        cfg = DataConfig(train=noise_folder, image_size=80, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                         num_workers=1 if backend == "dali" else 0)
        loader = build_loader(backend, cfg, LoaderRequest(split="train", batch_size=24, augment=augment,
                                                          num_views=2, seed=1))
        views, _ = next(iter(loader))
        rough[augment] = _roughness(torch.cat(views).float())
    sharp = rough["contrastive"].min()
    blurred = (rough["simclr"] < 0.8 * sharp).float().mean()
    assert 0.25 <= blurred <= 0.75, (rough, blurred)


@pytest.mark.parametrize("backend,decode", [("torchvision", "host"), ("torchvision", "device"), ("dali", "host"),
                                            ("ffcv", "host")])
def test_each_view_crops_at_its_own_scale(noise_folder, tmp_path, backend, decode):
    """data.view_crop_scales: view 0 crops 90-100 % of each image (its noise downscaled, rough), view 1
    2-5 % (a patch upscaled, smooth)."""
    pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}.get(backend, "torch"))
    source = noise_folder
    if backend == "ffcv":
        from loaders.ffcv_convert import convert
        source = tmp_path / "noise.beton"
        convert(noise_folder, source, write_mode="raw", num_workers=1)
    cfg = DataConfig(train=source, image_size=32, num_workers=1 if backend != "torchvision" else 0, decode=decode,
                     view_crop_scales=((0.9, 1.0), (0.02, 0.05)))
    loader = build_loader(backend, cfg, LoaderRequest(split="train", batch_size=8, augment=("basic", "basic"),
                                                      num_views=2, seed=0))
    (whole, patch), _ = next(iter(loader))
    assert _roughness(patch.float()).max() < _roughness(whole.float()).min()
    one_scale = cfg.model_copy(update={"view_crop_scales": None, "crop_scale": (0.9, 1.0)})
    (first, second), _ = next(iter(build_loader(backend, one_scale, LoaderRequest(
        split="train", batch_size=8, augment=("basic", "basic"), num_views=2, seed=0))))
    assert _roughness(second.float()).min() > _roughness(patch.float()).max()  # the scales made the difference


def test_view_crop_scales_need_one_entry_per_view(tmp_path):
    from fasttrain.recipe import RecipeError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: selfcon\ndata: {{train: {tmp_path}, val: {tmp_path}, "
                      f"view_crop_scales: [[0.08, 1.0], [0.2, 1.0]]}}\n")
    with pytest.raises(RecipeError, match=r"data.view_crop_scales=\[\[0.08, 1.0\], \[0.2, 1.0\]\]: method=selfcon "
                                          r"has 1 view"):
        load_recipe(recipe)
    with pytest.raises(RecipeError, match=r"view_crop_scales\[1\]=\[0.5, 0.2\] must satisfy"):
        load_recipe(recipe, ["method=supcon", "data.view_crop_scales=[[0.08,1],[0.5,0.2]]"])


def test_ffcv_refuses_the_simclr_augmentation(sources):
    pytest.importorskip("ffcv")
    cfg = DataConfig(train=sources["ffcv"], image_size=16, num_workers=1, augment="simclr")
    with pytest.raises(LoaderError, match="data.augment=simclr: the ffcv backend has no Gaussian blur"):
        build_loader("ffcv", cfg, LoaderRequest(split="train", batch_size=4, augment="simclr"))


def test_prefetch_depth_per_backend():
    """What the throughput benchmark skips before timing: the batches each backend decodes ahead."""
    from loaders import prefetch_batches
    cfg = DataConfig(num_workers=2)
    assert [prefetch_batches(b, cfg) for b in ("torchvision", "dali", "ffcv", "synthetic")] == [8, 2, 3, 0]


def test_the_official_cds_cifar_views(tmp_path):
    """padcrop_cutout: a 4-pixel padded crop (grey padding), a flip and a Cutout square set to 0 before
    normalising; padcrop_contrastive: the padded crop with colour. Both keep the image's size."""
    from loaders.torchvision_loader import Cutout
    root = colour_folder(tmp_path / "c", [4])
    cfg = DataConfig(train=root, image_size=32, num_workers=0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.manual_seed(0)
    loader = build_loader("torchvision", cfg, LoaderRequest(split="train", batch_size=4, num_views=2,
                                                            augment=("padcrop_cutout", "padcrop_contrastive")))
    (cut, coloured), _ = next(iter(loader))
    assert cut.shape == coloured.shape == (4, 3, 32, 32)
    assert all((image == -1).all(dim=0).sum() >= 16 for image in cut)  # (0 - 0.5) / 0.5: a zeroed square
    image = torch.ones(3, 10, 10)
    holes = [(Cutout(4)(image) == 0).all(dim=0).sum().item() for _ in range(200)]
    assert max(holes) == 16 and min(holes) < 16  # a 4 x 4 square, clipped where it meets a border
