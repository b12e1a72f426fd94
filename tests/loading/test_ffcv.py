"""The FFCV backend on CPU: conversion (labels, skips, atomic output, CLI), loading (labels, crops,
views, colour augmentation, sharding, progressive resizing, bad files) and the numba noise filter."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.transforms import functional as TF

pytest.importorskip("ffcv")

from conftest import REPO, make_image_folder  # noqa: E402
from loaders import DataConfig, LoaderError, LoaderRequest, build_loader  # noqa: E402
from loaders import ffcv_convert, ffcv_loader  # noqa: E402
from loaders.spec import ProgressiveResizing  # noqa: E402

MEAN = torch.tensor(DataConfig().mean).view(1, 3, 1, 1)
STD = torch.tensor(DataConfig().std).view(1, 3, 1, 1)


def ffcv(path, split="val", augment="center", batch_size=4, cfg=None, **kw):
    cfg = cfg or DataConfig(train=path, val=path, image_size=32, num_workers=1)
    return build_loader("ffcv", cfg, LoaderRequest(split=split, batch_size=batch_size, augment=augment, **kw))


def leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if ".beton" in p.name)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ffcv") / "images", classes=3, per_class=4)


@pytest.fixture(scope="module")
def beton(folder):
    out = folder.parent / "data.beton"
    summary = ffcv_convert.convert(folder, out, num_workers=2, verify_output=True)
    assert (summary["images"], summary["classes"], summary["skipped"]) == (12, 3, [])
    assert summary["bytes"] == out.stat().st_size and summary["images_per_s"] > 0 and summary["verified"]
    return out


def test_round_trip_counts_labels_and_fresh_buffers(folder, beton):
    source = [label for _, label in ImageFolder(folder).samples]
    cfg = DataConfig(val=beton, image_size=32, num_workers=1)
    loader = ffcv(beton, cfg=cfg, batch_size=2, channels_last=True)
    tv = build_loader("torchvision", cfg.model_copy(update={"val": folder, "num_workers": 0}),
                      LoaderRequest(split="val", batch_size=2, augment="center"))
    assert (loader.num_samples, loader.num_classes, len(loader)) == (tv.num_samples, tv.num_classes, len(tv))
    batches = list(loader)
    labels = torch.cat([b[1] for b in batches])
    assert labels.tolist() == source == torch.cat([b[1] for b in tv]).tolist()
    first = batches[0][0][0]
    assert first.shape == (2, 3, 32, 32) and first.dtype == torch.float32
    assert first.is_contiguous(memory_format=torch.channels_last)
    # 6 batches > ffcv's 5 buffer slots: a handed-out buffer would be reused and overwritten
    assert len({b[0][0].data_ptr() for b in batches}) == len(batches)
    assert torch.equal(first, next(iter(loader))[0][0])


def test_center_crop_matches_torchvision(tmp_path):
    # Smooth, asymmetric images: on make_image_folder's per-pixel noise a pixel comparison would
    # measure the two resampling kernels, not the crop geometry.
    root = make_image_folder(tmp_path / "img", classes=2, per_class=3, size=(96, 72))
    y, x = np.mgrid[0:72, 0:96]
    for k, f in enumerate(sorted(root.glob("*/*.jpg"))):
        img = np.stack([255 * x / 96, 255 * y / 72, 128 + 100 * np.sin(x / 9 + y / 13 + k)], -1)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(f, quality=95)
    ffcv_convert.convert(root, tmp_path / "raw.beton", write_mode="raw", num_workers=1)
    req = LoaderRequest(split="val", batch_size=6, augment="center")
    cfg = DataConfig(val=tmp_path / "raw.beton", image_size=32, num_workers=1)
    ours = next(iter(build_loader("ffcv", cfg, req)))[0][0]
    ref = next(iter(build_loader("torchvision", cfg.model_copy(update={"val": root, "num_workers": 0}), req)))[0][0]
    # ffcv crops int(0.875*72) source pixels then resizes (cv2 INTER_AREA); torchvision resizes to 37
    # (antialiased bilinear) then crops: windows agree within half a source pixel, which on these
    # gradients (~0.08 normalised units per output pixel) measures ~0.05. A 1-pixel shift gives 0.15,
    # val_resize_ratio=1 gives 0.2, a flip 0.9, swapped channels 0.85.
    assert (ours - ref).abs().mean() < 0.08
    assert (ours[..., 1:] - ref[..., :-1]).abs().mean() > 0.12  # the measure sees a 1-pixel shift


def class_colours(folder):
    """Mean colour of each class's source images, in normalised units."""
    per_class = {}
    for path, label in ImageFolder(folder).samples:
        rgb = torch.tensor(np.asarray(Image.open(path).convert("RGB")), dtype=torch.float32) / 255
        per_class.setdefault(label, []).append((rgb.mean((0, 1)) - MEAN.view(3)) / STD.view(3))
    return {label: torch.stack(means).mean(0) for label, means in per_class.items()}


def colour_shift(view, labels, colours):
    """Per sample, the largest channel difference between the view's mean colour and its class's."""
    expected = torch.stack([colours[int(label)] for label in labels])
    return (view.float().mean((2, 3)) - expected).abs().amax(1)


@pytest.mark.parametrize("stage", ["host", "device"])
def test_two_views_differ_and_colour_augmentation(folder, beton, stage):
    colours = class_colours(folder)
    cfg = DataConfig(train=beton, image_size=32, num_workers=1, output_dtype="bfloat16", colour_stage=stage)
    loader = ffcv(beton, split="train", augment="contrastive", num_views=2, cfg=cfg, channels_last=True)
    assert (len(loader), loader.num_samples) == (3, 12)
    assert (loader.stages is None) == (stage == "host")  # device: uint8 crops, the colour in torch
    shifts = []
    for (a, b), labels in loader:
        assert a.shape == b.shape == (4, 3, 32, 32) and a.dtype == b.dtype == torch.bfloat16
        assert a.is_contiguous(memory_format=torch.channels_last) and labels.dtype == torch.int64
        assert (a.float() - b.float()).abs().mean() > 0.1  # two crops of the same images
        shifts += [colour_shift(a, labels, colours), colour_shift(b, labels, colours)]
    # ColorJitter(0.4, ...) with p=0.8 moves a mean colour by up to ~0.9; crops alone (see the
    # progressive test) stay within 0.1
    assert (torch.cat(shifts) > 0.3).sum() >= 6


def test_the_views_of_one_decode_are_each_cropped_and_flipped_on_their_own(tmp_path):
    """Training decodes each image once for every view (``ViewCropsDecoder``): with whole-image crops
    (scale 1, ratio 1, square images) each view is the image or its mirror, flipped with p=0.5 per view
    independently; a view with its own crop scale gets its own crop size."""
    gradient = np.repeat(np.repeat(np.linspace(0, 255, 32).astype(np.uint8)[None, :, None], 32, 0), 3, 2)
    for c in range(2):
        (tmp_path / "img" / f"c{c}").mkdir(parents=True)
        for i in range(48):
            Image.fromarray(gradient).save(tmp_path / "img" / f"c{c}" / f"{i}.png")  # left dark, right bright
    ffcv_convert.convert(tmp_path / "img", tmp_path / "g.beton", num_workers=1)
    cfg = DataConfig(train=tmp_path / "g.beton", image_size=32, num_workers=1, crop_scale=(1.0, 1.0),
                     crop_ratio=(1.0, 1.0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    flipped = []
    for (a, b), _ in ffcv(None, split="train", augment="basic", num_views=2, cfg=cfg, batch_size=16):
        for view in (a, b):
            left, right = view[..., :8].mean(dim=(1, 2, 3)), view[..., -8:].mean(dim=(1, 2, 3))
            assert ((left - right).abs() > 0.5).all()  # a whole image, mirrored or not
            flipped.append(left > right)
    first, second = torch.cat(flipped[0::2]).float(), torch.cat(flipped[1::2]).float()
    assert 0.3 < first.mean() < 0.7 and 0.3 < second.mean() < 0.7
    assert 0.1 < (first * second).mean() < 0.4  # independent coins: both flipped about a quarter of the time
    per_view = cfg.model_copy(update={"view_crop_scales": [(1.0, 1.0), (0.1, 0.1)]})
    (whole, small), _ = next(iter(ffcv(None, split="train", augment="basic", num_views=2, cfg=per_view)))
    # a tenth of the area, resized to the same size, stretches the gradient ~3x: smaller steps between neighbours
    assert whole.diff(dim=-1).abs().mean() > 2 * small.diff(dim=-1).abs().mean()


def test_the_device_stage_normalises_the_same_centre_crops(beton):
    cfg = DataConfig(val=beton, image_size=32, num_workers=1)
    host = [v[0] for v, _ in ffcv(beton, cfg=cfg)]
    device = [v[0] for v, _ in ffcv(beton, cfg=cfg.model_copy(update={"colour_stage": "device"}))]
    assert len(host) == len(device) == 3
    for h, d in zip(host, device):  # the same uint8 crops, normalised by numba or by torch
        assert torch.allclose(h, d, atol=1e-5)


def test_progressive_resizing_and_basic_keeps_colour(folder, beton):
    colours = class_colours(folder)
    ramp = ProgressiveResizing(min_size=16, max_size=32, start_epoch=0, end_epoch=2, step=16)
    cfg = DataConfig(train=beton, image_size=32, num_workers=1, progressive=ramp)
    loader = ffcv(beton, split="train", augment="basic", cfg=cfg)
    sizes, shifts = [], []
    for epoch in (0, 2):
        loader.set_epoch(epoch)
        sizes.append(set())
        for (view,), labels in loader:
            sizes[-1].add(tuple(view.shape[-2:]))
            shifts.append(colour_shift(view, labels, colours))
    assert sizes == [{(16, 16)}, {(32, 32)}]
    # a crop of >= 8% of the image averages >= 245 noise pixels (sd 0.4): its mean is within ~0.03
    assert torch.cat(shifts).max() < 0.1


def test_jitter_is_torchvision_maths_per_sample():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 12, 10, 3), dtype=np.uint8)
    factors = rng.uniform(0.6, 1.4, size=(8, 4)).astype(np.float32)
    factors[:, 3] = rng.uniform(-0.1, 0.1, size=8)
    orders = [rng.permutation(4) for _ in range(8)]
    apply = [1, 1, 1, 1, 1, 0, 1, 0]
    gray = [0, 0, 1, 0, 0, 0, 0, 1]
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(8):
        y = torch.from_numpy(images[i]).permute(2, 0, 1).float() / 255
        for op in orders[i] if apply[i] else []:
            y = ops[op](y, float(factors[i, op]))
        expected = ((TF.rgb_to_grayscale(y, 3) if gray[i] else y) * 255).round().permute(1, 2, 0).numpy()
        got = np.empty_like(images[i])
        ffcv_loader.jitter_image(images[i], got, factors[i], orders[i], bool(apply[i]), bool(gray[i]))
        assert np.abs(got.astype(float) - expected).max() <= 1, i  # one rounding to uint8 at the end
        if not apply[i] and not gray[i]:
            assert np.array_equal(got, images[i])  # untouched, bit for bit


def test_colour_op_draws_jitter_and_grayscale_per_sample():
    """The operation ffcv compiles, run as Python: p=0.8 jitter and p=0.2 grayscale, drawn per sample."""
    images = np.tile(np.array([200, 60, 30], np.uint8), (2000, 2, 4, 4, 1))  # [B, V, H, W, 3]
    colour = ffcv_loader.ColourJitter([(0.4, 0.4, 0.4, 0.1), None]).generate_code()  # view 1: no colour
    np.random.seed(0)
    out = colour(images, np.empty_like(images))
    coloured = out[:, 0]
    unchanged = (coloured == images[:, 0]).all(axis=(1, 2, 3)).mean()
    grey = ((coloured[..., 0] == coloured[..., 1]) & (coloured[..., 1] == coloured[..., 2])).all(axis=(1, 2)).mean()
    assert abs(unchanged - 0.2 * 0.8) < 0.03 and abs(grey - 0.2) < 0.03
    assert len({tuple(o[0, 0]) for o in coloured}) > 500  # factors differ from sample to sample
    assert np.array_equal(out[:, 1], images[:, 1])  # a view without colour is left as it is


def test_corrupt_image_is_skipped_and_reported(tmp_path, caplog):
    root = make_image_folder(tmp_path / "img", classes=2, per_class=2, corrupt=1)
    summary = ffcv_convert.convert(root, tmp_path / "out.beton", num_workers=1, verify_output=True)
    assert summary["images"] == 4 and len(summary["skipped"]) == 1 and "broken_0.jpg" in summary["skipped"][0]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "broken_0.jpg" in warnings[0].getMessage()
    labels = torch.cat([lab for _, lab in ffcv(tmp_path / "out.beton", batch_size=3)])
    assert labels.tolist() == [0, 0, 1, 1]


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch, capfd):
    root = make_image_folder(tmp_path / "img", classes=2, per_class=3)
    original = ffcv_convert._ImageDataset.__getitem__

    def fails_midway(self, index):  # runs in the writer's worker process
        if index == 3:
            raise OSError("disk went away")
        return original(self, index)

    monkeypatch.setattr(ffcv_convert._ImageDataset, "__getitem__", fails_midway)
    with pytest.raises(RuntimeError, match="worker failed: OSError: disk went away"):
        ffcv_convert.convert(root, tmp_path / "out.beton", num_workers=1, chunksize=1)
    assert leftovers(tmp_path) == []
    assert "Traceback" not in capfd.readouterr().err  # the worker's error is one line in the parent's error
    monkeypatch.setattr(ffcv_convert._ImageDataset, "__getitem__", original)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ffcv_convert, "verify", interrupt)
    (tmp_path / "out.beton").write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt):
        ffcv_convert.convert(root, tmp_path / "out.beton", num_workers=1, verify_output=True)
    assert leftovers(tmp_path) == ["out.beton"] and (tmp_path / "out.beton").read_bytes() == b"previous"


def test_sigterm_during_writing_removes_the_temp_file_and_shared_memory(tmp_path):
    root = make_image_folder(tmp_path / "img", classes=2, per_class=4)
    (tmp_path / "out.beton").write_bytes(b"previous")
    (tmp_path / ".out.beton.tmp-999999999").write_bytes(b"left by a conversion killed earlier")
    created = tmp_path / "shared_memory_created"
    code = ("import os, signal, sys\n"
            "from multiprocessing import shared_memory\n"
            "class Recorded(shared_memory.SharedMemory):\n"  # names its segments, whatever else runs alongside
            "    def __init__(self, *args, **kwargs):\n"
            "        super().__init__(*args, **kwargs)\n"
            f"        open({str(created)!r}, 'a').write(self.name.lstrip('/') + '\\n')\n"
            "shared_memory.SharedMemory = Recorded\n"
            "from loaders import ffcv_convert\n"
            "read = ffcv_convert._ImageDataset.__getitem__\n"
            "def signal_parent(self, index):\n"
            "    if index == 2:\n"
            "        os.kill(os.getppid(), signal.SIGTERM)\n"
            "    return read(self, index)\n"
            "ffcv_convert._ImageDataset.__getitem__ = signal_parent\n"
            f"sys.exit(ffcv_convert.main([{str(root)!r}, {str(tmp_path / 'out.beton')!r}, '--num-workers', '1']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143 and "stopped by SIGTERM" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "leaked" not in proc.stderr
    assert leftovers(tmp_path) == ["out.beton"] and (tmp_path / "out.beton").read_bytes() == b"previous"
    segments = created.read_text().split()
    assert segments and not set(segments) & set(os.listdir("/dev/shm")), segments


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "no_such_dir"
    proc = subprocess.run([sys.executable, "-m", "loaders.ffcv_convert", str(missing), str(tmp_path / "o.beton")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and str(missing) in proc.stderr
    (tmp_path / "empty").mkdir()
    for src, out, named in [(tmp_path / "empty", tmp_path / "o.beton", tmp_path / "empty"),
                            (tmp_path, tmp_path / "nope" / "o.beton", tmp_path / "nope")]:
        assert ffcv_convert.main([str(src), str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(named) in err
    assert not (tmp_path / "o.beton").exists()


def test_validation_shards_count_each_sample_once(folder, beton):
    source = [label for _, label in ImageFolder(folder).samples]
    for rank in (0, 4):  # 12 samples over 5 processes: 3,3,2,2,2 (ffcv's own mode would pad to 3 each)
        loader = ffcv(beton, batch_size=2, rank=rank, world_size=5)
        labels = torch.cat([lab for _, lab in loader]).tolist()
        assert labels == source[rank::5] and loader.num_samples == len(labels)
    with pytest.raises(LoaderError, match="torch.distributed"):
        ffcv(beton, split="train", augment="basic", rank=0, world_size=2)


def test_bad_files_are_one_line_errors(folder, tmp_path):
    (tmp_path / "fake.beton").write_bytes(b"\0" * 64 + b"not ffcv" * 100)
    cases = [(tmp_path / "fake.beton", "not a readable .beton"), (folder, "ffcv_convert"),
             (tmp_path / "missing.beton", "no such file")]
    for path, message in cases:
        with pytest.raises(LoaderError, match=message) as info:
            ffcv(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_zeroed_image_bytes_are_refused_at_load(folder, tmp_path):
    from ffcv.reader import Reader

    for mode in ("jpg", "raw"):
        out = tmp_path / f"{mode}.beton"
        ffcv_convert.convert(folder, out, num_workers=1, write_mode=mode)
        assert len(ffcv(out)) > 0  # intact: loads
        table = Reader(str(out)).alloc_table  # (sample, ptr, size) of every stored field value
        with open(out, "r+b") as f:
            for _, ptr, size in table[table["ptr"] != 0][["sample_id", "ptr", "size"]].tolist():
                f.seek(int(ptr))
                f.write(bytes(int(size)))
        with pytest.raises(LoaderError, match=f"{out}: .*(not one|all zeros).*convert the folder again"):
            ffcv(out)


def test_a_validation_beton_with_other_classes_is_refused(tmp_path, caplog):
    train = make_image_folder(tmp_path / "train", classes=3, per_class=2)
    val = make_image_folder(tmp_path / "val", classes=3, per_class=2)
    (val / "class_01").rename(tmp_path / "gone")  # val lacks a class: converted alone, its labels shift
    for src, name in ((train, "train"), (val, "val")):
        assert ffcv_convert.main([str(src), str(tmp_path / f"{name}.beton"), "--num-workers", "1"]) == 0
    assert json.loads((tmp_path / "train.classes.json").read_text()) == ["class_00", "class_01", "class_02"]
    cfg = DataConfig(train=tmp_path / "train.beton", val=tmp_path / "val.beton", image_size=32, num_workers=1)
    with pytest.raises(LoaderError, match=r"val.beton holds other classes than the training split \(missing "
                                          r"class_01\): convert it again with --classes-from TRAIN_DIR"):
        ffcv(None, cfg=cfg)
    (tmp_path / "gone").rename(val / "class_01")
    numbered = tmp_path / "numbered.beton"
    assert ffcv_convert.main([str(val), str(numbered), "--num-workers", "1", "--classes-from", str(train)]) == 0
    loader = ffcv(None, cfg=cfg.model_copy(update={"val": numbered}))
    assert loader.classes == ["class_00", "class_01", "class_02"] and loader.num_classes == 3
    (tmp_path / "numbered.classes.json").unlink()  # an earlier fasttrain's conversion: warned, not refused
    assert ffcv(None, cfg=cfg.model_copy(update={"val": numbered})).num_classes == 3
    assert any("cannot be checked" in r.getMessage() for r in caplog.records)


def test_numba_finalizer_noise_is_dropped_and_nothing_else():
    def raise_in(filename):
        namespace = {}
        exec(compile("def finalizer():\n    {}[('Array(uint8)',)]\n", filename, "exec"), namespace)
        try:
            namespace["finalizer"]()
        except KeyError as exc:
            return types.SimpleNamespace(exc_type=KeyError, exc_value=exc, exc_traceback=exc.__traceback__,
                                         err_msg=None, object=None)

    seen = []
    hook = ffcv_loader._quiet_hook(seen.append)
    noise, other = raise_in("/x/site-packages/numba/core/dispatcher.py"), raise_in("/x/mycode.py")
    hook(noise)
    hook(other)
    assert seen == [other]


def test_importing_the_ffcv_modules_keeps_torchs_thread_count():
    # ffcv sets torch's intra-op thread count to 1 when imported; training must not inherit that
    code = ("import torch; torch.set_num_threads(2); import loaders.ffcv_convert, loaders.ffcv_loader; "
            "print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "2"
