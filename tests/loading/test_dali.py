"""The DALI backend on CPU: labels, layout, normalisation, views, sharding, evaluation counts, bad files."""
import logging

import pytest
import torch
from torchvision.datasets import ImageFolder

pytest.importorskip("nvidia.dali")

from conftest import MEAN, PALETTE, STD, colour_folder, identities, make_image_folder, rgb  # noqa: E402
from loaders import DataConfig, LoaderError, LoaderRequest, build_loader  # noqa: E402

def cfg_for(root, **kw):
    return DataConfig(train=root, val=root, image_size=16, num_workers=1, **kw)


def dali(root, split="val", augment="center", batch_size=4, cfg=None, **kw):
    req = LoaderRequest(split=split, batch_size=batch_size, augment=augment, **kw)
    return build_loader("dali", cfg or cfg_for(root), req)


def test_labels_and_pixels_match_torchvision(tmp_path):
    root = make_image_folder(tmp_path / "img", classes=4, per_class=3, size=(80, 60))
    cfg = cfg_for(root).model_copy(update={"num_workers": 0})
    req = LoaderRequest(split="val", batch_size=5, augment="center")
    tv, ours = build_loader("torchvision", cfg, req), build_loader("dali", cfg, req)
    assert ours.num_classes == tv.num_classes == 4 and ours.classes == tv.classes
    tv_batches, our_batches = list(tv), list(ours)
    assert [len(labels) for _, labels in our_batches] == [5, 5, 2] and len(ours) == 3
    assert torch.equal(torch.cat([labels for _, labels in our_batches]),
                       torch.cat([labels for _, labels in tv_batches]))
    # same images in the same order: per-image channel means agree (resize kernels differ a little)
    ours_mean = torch.cat([v[0] for v, _ in our_batches]).mean(dim=(2, 3))
    tv_mean = torch.cat([v[0] for v, _ in tv_batches]).mean(dim=(2, 3))
    assert (ours_mean - tv_mean).abs().max() < 0.05
    # training sees the same label multiset (one batch = the whole epoch)
    (_, labels), = list(dali(root, "train", "basic", batch_size=12))
    assert sorted(labels.tolist()) == sorted(ImageFolder(root).targets)


@pytest.mark.parametrize("dtype,channels_last", [("float32", False), ("float16", True), ("bfloat16", True)])
def test_shapes_dtype_layout(tmp_path, dtype, channels_last):
    root = make_image_folder(tmp_path / "img", classes=2, per_class=4)
    loader = dali(root, "train", "contrastive", cfg=cfg_for(root, output_dtype=dtype),
                  num_views=2, channels_last=channels_last)
    assert len(loader) == 2 and loader.num_samples == 8 and loader.num_classes == 2
    for views, labels in loader:
        assert len(views) == 2
        for v in views:
            assert v.shape == (4, 3, 16, 16) and v.dtype == getattr(torch, dtype) and v.device.type == "cpu"
            assert v.is_contiguous(memory_format=torch.channels_last) == channels_last
            assert torch.isfinite(v.float()).all()
        assert labels.dtype == torch.int64 and labels.shape == (4,)
        assert set(labels.tolist()) <= {0, 1}


@pytest.mark.parametrize("augment,split", [("center", "val"), ("basic", "train")])
def test_constant_image_comes_out_normalised(tmp_path, augment, split):
    root = colour_folder(tmp_path / "img", [4, 4])
    (views, _), = list(dali(root, split, augment, batch_size=8))  # one batch: the whole set
    expected = torch.stack([torch.tensor(PALETTE[i], dtype=torch.float32) for i in identities(views[0])])
    expected = (expected.view(8, 3, 1, 1) / 255 - MEAN) / STD
    assert (views[0] - expected).abs().max() < 3 / 255 / 0.224  # a few JPEG levels
    assert sorted(identities(views[0])) == list(range(8))


@pytest.mark.parametrize("decode", ["once", "per_view"])
def test_two_views_differ_and_colour_augmentation_applies(tmp_path, decode):
    root = make_image_folder(tmp_path / "img", classes=2, per_class=4)
    cfg = cfg_for(root, dali={"decode": decode})
    (a, b), _ = next(iter(dali(root, "train", "contrastive", batch_size=8, num_views=2, cfg=cfg)))
    assert ((a - b).abs().flatten(1).mean(1) > 0.05).all()  # every pair differs
    # on constant images only the colour ops can change a pixel; grayscale shows as R = G = B
    flat = colour_folder(tmp_path / "flat", [24], distinct=False)
    cfg = cfg_for(flat, dali={"decode": decode})
    (a, b), _ = next(iter(dali(flat, "train", "contrastive", batch_size=24, num_views=2, cfg=cfg)))
    (c,), _ = next(iter(dali(flat, "train", "basic", batch_size=24)))
    assert identities(c) == [25] * 24  # basic leaves colours alone
    moved = [(p - torch.tensor(PALETTE[25])).abs().max() > 8 for p in rgb(torch.cat([a, b])).mean(dim=(2, 3))]
    assert 0 < sum(moved) < 48  # jitter p=0.8: some views keep their colour
    grey = [p.max() - p.min() < 3 for p in rgb(torch.cat([a, b])).mean(dim=(2, 3))]
    assert 0 < sum(grey) < 24  # grayscale p=0.2


def test_training_shards_cover_the_set_without_overlap(tmp_path):
    root = colour_folder(tmp_path / "img", [10, 14])
    loaders = [dali(root, "train", "basic", batch_size=4, rank=r, world_size=2, seed=3) for r in (0, 1)]
    assert [len(loader) for loader in loaders] == [3, 3] and [loader.num_samples for loader in loaders] == [12, 12]
    orders = []
    for epoch in range(2):
        seen = []
        for loader in loaders:
            loader.set_epoch(epoch)
            seen.append([i for (v,), _ in loader for i in identities(v)])
        assert [len(s) for s in seen] == [12, 12]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(24))
        orders.append({frozenset(s) for s in seen})
    assert orders[0] != orders[1]  # reshuffled across shards every epoch


@pytest.mark.parametrize("batch_size", [3, 4])  # shard a multiple of the batch, or a partial dropped
def test_training_uneven_set_gives_equal_steps_and_clean_epochs(tmp_path, batch_size):
    root = colour_folder(tmp_path / "img", [6, 7])  # 13 images: one sits out, shards of 6
    loaders = [dali(root, "train", "basic", batch_size=batch_size, rank=r, world_size=2) for r in (0, 1)]
    steps = 6 // batch_size
    for _ in range(3):
        seen = [[i for (v,), _ in loader for i in identities(v)] for loader in loaders]
        assert [len(s) for s in seen] == [steps * batch_size] * 2 and [len(loader) for loader in loaders] == [steps] * 2
        assert len(set(seen[0] + seen[1])) == 2 * steps * batch_size


@pytest.mark.parametrize("world_size", [2, 3])
def test_evaluation_counts_every_sample_once(tmp_path, world_size):
    root = colour_folder(tmp_path / "img", [6, 7])  # 13 images, batch 4: not divisible by 4 * world
    loaders = [dali(root, batch_size=4, rank=r, world_size=world_size) for r in range(world_size)]
    assert sum(loader.num_samples for loader in loaders) == 13
    for _ in range(2):  # a second epoch starts clean, too
        seen = []
        for loader in loaders:
            rows = [(identities(v), labels.tolist()) for (v,), labels in loader]
            assert sum(len(ids) for ids, _ in rows) == loader.num_samples and len(rows) == len(loader)
            seen += [pair for ids, labels in rows for pair in zip(ids, labels)]
        assert sorted(seen) == [(i, int(i >= 6)) for i in range(13)]  # each image once, its own label


def test_corrupt_jpeg_is_skipped_and_reported(tmp_path, caplog):
    root = make_image_folder(tmp_path / "img", classes=2, per_class=3, corrupt=1)
    broken = str(root / "class_00" / "broken_0.jpg")
    with caplog.at_level(logging.WARNING):
        val = dali(root, batch_size=4)
        train = dali(root, "train", "contrastive", batch_size=2, num_views=2)
    assert val.skipped == train.skipped == {broken}
    assert sum(broken in r.getMessage() for r in caplog.records) == 2  # one warning per loader
    assert val.num_samples == 6 and train.num_samples == 6
    assert sorted(t for _, labels in val for t in labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert sum(len(labels) for _, labels in train) == 6


def test_too_few_images_is_a_clear_error(tmp_path):
    root = make_image_folder(tmp_path / "img", classes=1, per_class=3)
    with pytest.raises(LoaderError, match="fewer than one batch"):
        dali(root, "train", "basic", batch_size=4)
    with pytest.raises(LoaderError, match="data.val: no such directory"):
        dali(tmp_path / "missing")


def test_the_dali_build_matches_torchs_cuda():
    """setup.py's DALI wheel is the build for torch's CUDA major version (a CUDA-12 DALI beside a
    CUDA-13 torch loads CUDA-12 libraries that are not there)."""
    import importlib.metadata
    builds = sorted({d.metadata["Name"].lower() for d in importlib.metadata.distributions()
                     if (d.metadata["Name"] or "").lower().startswith("nvidia-dali-cuda")})
    assert builds == [f"nvidia-dali-cuda{torch.version.cuda.split('.')[0]}0"]


def test_device_threads_and_prefetch_come_from_the_recipe(tmp_path):
    from loaders.dali_loader import placement

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    # on a GPU: nvJPEG and GPU ops, or (data.dali.device: cpu) the same ops on the CPU with DALI's copy to the GPU
    assert placement(DataConfig(), cuda) == ("mixed", False)
    assert placement(DataConfig(dali={"device": "cpu"}), cuda) == ("cpu", True)
    for device in ("gpu", "cpu"):  # without a GPU, the CPU either way
        assert placement(DataConfig(dali={"device": device}), cpu) == ("cpu", False)
    root = make_image_folder(tmp_path / "img", classes=2, per_class=4)
    loader = dali(root, "train", "contrastive", cfg=cfg_for(root, dali={"threads": 2, "prefetch": 3, "device": "cpu"}))
    pipe = loader.iterator._pipes[0]
    assert (pipe.num_threads, pipe.prefetch_queue_depth, loader.decode_device) == (2, 3, "cpu")
    assert sum(len(labels) for _, labels in loader) == 8
    for key, value in (("device", "tpu"), ("threads", 0), ("prefetch", 0)):
        with pytest.raises(ValueError, match=key):
            DataConfig(dali={key: value})
