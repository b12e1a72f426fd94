"""The benchmarks in tiny configurations: they run, and write complete results. No timing is asserted."""
import json
from pathlib import Path

import pytest

from benchmarks import (decode_ceiling, loader_throughput, loss_scaling, make_photo_folder, recipe_cost, step_cost,
                        train_throughput)
from conftest import REPO, make_image_folder  # noqa: E402


def _physical_memory() -> int:
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _positive(row: dict, keys):
    for key in keys:
        assert key in row, f"{key} missing from {sorted(row)}"
        assert row[key] is not None and row[key] > 0, f"{key}={row[key]!r}"


def _outputs(folder: Path, stem: str) -> dict:
    for suffix in ("json", "md", "png"):
        assert (folder / f"{stem}.{suffix}").stat().st_size > 0, f"{stem}.{suffix}"
    return json.loads((folder / f"{stem}.json").read_text())


@pytest.mark.slow
def test_step_cost_tiny(tmp_path, capsys):
    out = tmp_path / "step_cost"
    rc = step_cost.main(["--arch", "resnet18", "--batch-size", "4", "--image-size", "32", "--warmup", "1",
                         "--steps", "2", "--methods", "ce,supcon,selfcon,cds,mixco", "--threads", "1",
                         "--out", str(out), "--profile", "--profile-steps", "1"])
    assert rc == 0
    data = _outputs(out, "step_cost")
    assert [r["method"] for r in data["methods"]] == ["ce", "supcon", "selfcon", "cds", "mixco"]
    for row in data["methods"]:
        _positive(row, ["num_views", "step_time_median_s", "images_per_second", "peak_memory_bytes",
                        "batch_size", "image_size", "memory_ratio_to_selfcon", "time_ratio_to_selfcon",
                        "cpu_time_ratio_to_selfcon", "parameters"])
        low, high = sorted(row["step_times_s"])  # two steps: the inclusive quartiles are at 1/4 and 3/4 between
        assert row["step_time_iqr_s"] == pytest.approx((high - low) / 2) and low <= row["step_time_median_s"] <= high
        assert row["memory_kind"] and row["device"] == "cpu" and row["arch"] == "resnet18"
        assert row["precision"] == "bf16" and isinstance(row["uses_subnetwork"], bool)
    ce, supcon, selfcon, cds, mixco = data["methods"]
    assert (mixco["forward_images_per_image"], supcon["forward_images_per_image"]) == (3, 2)
    assert (cds["num_views"], cds["exits"], cds["exit_kind"]) == (2, ["layer1", "layer2", "layer3"], "sepconv")
    assert cds["paper_time_ratio"] is None and cds["time_ratio_to_selfcon"] > 0
    assert ce["paper_time_ratio"] is None and ce["memory_ratio_to_selfcon"] > 0
    _positive(supcon, ["paper_memory_ratio", "paper_time_ratio"])
    assert (supcon["num_views"], supcon["uses_subnetwork"]) == (2, False)
    assert (selfcon["num_views"], selfcon["uses_subnetwork"]) == (1, True)
    assert selfcon["time_ratio_to_selfcon"] == 1.0 and supcon["paper_time_ratio"] == 2.2
    table = (out / "step_cost.md").read_text()
    assert "| SupCon |" in table and "×2.2" in table and table in capsys.readouterr().out
    # --profile: where each method's step goes, after (never inside) the timed steps
    for row in data["methods"]:
        parts = row["profile"]["parts_ms_per_step"]
        assert row["profile"]["steps"] == 1 and Path(row["profile"]["trace"]).stat().st_size > 0
        assert parts["trunk"] > 0 and parts["backward"] > 0 and parts["optimizer"] > 0
        assert (parts["subnetworks"] > 0) == row["uses_subnetwork"], row["method"]
    assert "Where a step's time goes" in table and "| SelfCon | " in table.split("Where a step's time goes")[1]
    assert (out / "step_cost_parts.png").stat().st_size > 0


def test_recipe_cost_times_each_distinct_step_once_and_scales_by_dataset_and_epochs(tmp_path):
    """Three paper recipes, two steps: SelfCon on CIFAR-10 and CIFAR-100 share one (no classifier: the
    class count does not matter), SupCon-S has its own; device-hours follow images × epochs ÷ rate."""
    out = tmp_path / "cost"
    recipes = ["recipes/paper/selfcon_table1/cifar10_r18_selfcon.yaml", "recipes/paper/selfcon_cifar100_r18.yaml",
               "recipes/paper/selfcon_table1/cifar10_r18_supcon_s.yaml"]
    rc = recipe_cost.main([*recipes, "--set", "data.image_size=16", "--set", "model.width=8",
                           "--set", "train.precision=fp32", "--max-batch", "4",
                           "--warmup", "0", "--steps", "2", "--images", "cifar10=5000", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "recipe_cost.json").read_text())["recipes"]
    assert [r["dataset"] for r in rows] == ["cifar10", "cifar100", "cifar10"]
    assert [r["images_per_epoch"] for r in rows] == [5000, 50000, 5000]
    cifar10, cifar100, supcon_s = rows
    assert cifar10["images_per_second"] == cifar100["images_per_second"] != supcon_s["images_per_second"]
    assert cifar10["measured_batch"] == 4 and cifar10["recipe_batch"] == 1024
    for r in rows:
        assert r["device"] == "cpu" and r["epochs"] == 1000
        assert r["device_hours"] == pytest.approx(r["images_per_epoch"] * 1000 / r["images_per_second"] / 3600)
    assert "cifar10_r18_supcon_s.yaml" in (out / "recipe_cost.md").read_text()
    # out of time: nothing is timed, every recipe is listed as such, and that is no failure
    assert recipe_cost.main([recipes[0], "--timeout", "1e-9", "--out", str(tmp_path / "late")]) == 0
    late, = json.loads((tmp_path / "late" / "recipe_cost.json").read_text())["recipes"]
    assert late["status"] == "not timed: out of time" and late["device_hours"] is None


@pytest.mark.slow
def test_every_paper_recipe_takes_a_training_step(tmp_path):
    """Each recipe of recipes/paper builds its own step (model, exits, loss, optimizer) and trains, shrunk
    to 16 px, width 8 and 4 images: a recipe the trainer cannot run fails here, not on a GPU node."""
    out = tmp_path / "all"
    assert recipe_cost.main([str(REPO / "recipes/paper"), "--set", "data.image_size=16", "--set", "model.width=8",
                             "--set", "train.precision=fp32", "--max-batch", "4", "--warmup", "0", "--steps", "1",
                             "--out", str(out)]) == 0
    rows = json.loads((out / "recipe_cost.json").read_text())["recipes"]
    shipped = [p for p in (REPO / "recipes/paper").rglob("*.yaml")
               if not p.name.startswith("_") and p.name != "official.yaml"]
    assert len(rows) == len(shipped) and all(r["images_per_second"] > 0 and r["device_hours"] > 0 for r in rows)
    assert {r["dataset"] for r in rows} == set(recipe_cost.DATASETS)  # every dataset of the papers is known


@pytest.mark.parametrize("failure", ["allocator", "cublas"])
def test_recipe_cost_halves_a_batch_that_does_not_fit_down_to_two(monkeypatch, failure):
    import torch

    tried = []

    def fits(limit):
        def time_step(step, args):
            tried.append(step["train"]["batch_size"])
            if step["train"]["batch_size"] > limit:
                raise (torch.OutOfMemoryError("CUDA out of memory") if failure == "allocator"
                       else RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
            return {"images_per_second": 100.0, "device": "cuda:0", "step_time_median_s": 0.08}
        return time_step

    step = {"train": {"batch_size": 32, "compile": False}}
    monkeypatch.setattr(recipe_cost, "time_step", fits(8))
    assert recipe_cost.measure(step, None)["measured_batch"] == 8 and tried == [32, 16, 8]
    monkeypatch.setattr(recipe_cost, "time_step", fits(1))  # BatchNorm needs two images: no batch of one
    with pytest.raises((torch.OutOfMemoryError, RuntimeError)):
        recipe_cost.measure(step, None)
    assert tried[3:] == [32, 16, 8, 4, 2]


def test_photo_folder_from_wallpapers(tmp_path):
    # scripts/bootstrap.sh installs lomiri-wallpapers-16.04; without it this fails rather than skips
    assert make_photo_folder.candidates(), "no wallpaper package installed: apt-get install lomiri-wallpapers-16.04"
    out = tmp_path / "photos"
    assert make_photo_folder.main([str(out), "--classes", "2", "--per-class", "3", "--seed", "1"]) == 0
    files = sorted(out.rglob("*.jpg"))
    assert len(files) == 6 and sorted(p.name for p in out.iterdir() if p.is_dir()) == ["class_00", "class_01"]
    from PIL import Image
    for path in files:
        with Image.open(path) as image:
            assert (image.format, image.size) == ("JPEG", (500, 375))
    manifest = json.loads((out / "sources.json").read_text())
    assert all(len(v) == 3 for v in manifest["classes"].values())
    assert make_photo_folder.main([str(out), "--classes", "2", "--per-class", "3"]) == 2  # no overwrite


def test_photo_folder_without_packages(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(make_photo_folder, "ROOTS", (tmp_path / "nothing",))
    assert make_photo_folder.main([str(tmp_path / "out")]) == 2
    assert "apt-get install lomiri-wallpapers-16.04" in capsys.readouterr().err


@pytest.mark.slow
def test_loader_throughput_tiny(tmp_path):
    data = make_image_folder(tmp_path / "images", classes=2, per_class=8, size=(80, 60))
    out = tmp_path / "loaders"
    rc = loader_throughput.main(["--data", str(data), "--backends", "torchvision", "--views", "1,2",
                                 "--workers", "0", "--batch-size", "4", "--image-size", "32", "--batches", "2",
                                 "--out", str(out)])
    assert rc == 0
    results = _outputs(out, "loader_throughput")["results"]
    assert [(r["backend"], r["num_views"]) for r in results] == [("torchvision", 1), ("torchvision", 2)]
    for row in results:
        assert row["available"] is True
        _positive(row, ["images_per_second", "crops_per_second", "batch_time_median_s", "batch_size",
                        "image_size", "timed_batches", "build_seconds", "dataset_images"])
        assert row["view_shape"] == [4, 3, 32, 32]
    assert results[1]["crops_per_second"] == pytest.approx(2 * results[1]["images_per_second"])
    ceiling = json.loads((out / "decode_ceiling.json").read_text())
    assert set(ceiling["candidates"]) | set(ceiling["unavailable"]) == set(decode_ceiling.CANDIDATES)
    for row in results:
        best = ceiling["ceiling"][str(row["num_views"])]
        assert best["method"] in ceiling["candidates"]
        assert row["fraction_of_ceiling"] == pytest.approx(row["images_per_second"] / best["images_per_second"])
    assert "| ceiling |" in (out / "loader_throughput.md").read_text()
    # the colour on the device: the host stage alone and the device stage are timed apart
    assert loader_throughput.main(["--data", str(data), "--backends", "torchvision", "--views", "1", "--workers", "0",
                                   "--batch-size", "4", "--image-size", "32", "--batches", "2", "--colour-stage",
                                   "device", "--out", str(tmp_path / "split")]) == 0
    split, = _outputs(tmp_path / "split", "loader_throughput")["results"]
    assert split["host_stage_images_per_second"] > 0 and split["device_stage_ms_per_image"] > 0
    assert split["host_stage_fraction_of_ceiling"] == pytest.approx(
        split["host_stage_images_per_second"] / split["images_per_second"] * split["fraction_of_ceiling"])
    assert split["bytes_to_device_per_image"] == 3 * 32 * 32  # uint8 crops
    assert all(r["host_stage_images_per_second"] is None for r in results)  # the colour in the workers
    # decoded on the device: the files cross, not pixels (the same 1 view, every other number alike)
    rc = loader_throughput.main(["--data", str(data), "--backends", "torchvision", "--views", "1", "--workers", "0",
                                 "--batch-size", "4", "--image-size", "32", "--batches", "2", "--decode", "device",
                                 "--no-ceiling", "--out", str(tmp_path / "decoded")])
    row, = _outputs(tmp_path / "decoded", "loader_throughput")["results"]
    files = sorted(data.rglob("*.jpg"))
    assert rc == 0 and row["view_shape"] == [4, 3, 32, 32]
    assert row["bytes_to_device_per_image"] == round(sum(f.stat().st_size for f in files) / len(files))


def test_dct_downscaled_crops_match_full_decodes(tmp_path):
    """PIL's draft decodes at 1/2-1/8 size; the crops it gives must be the full decode's crops (same
    boxes: same seed), up to the resampling difference, and keep the output size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    smooth = np.stack([(x / 640 * 255), (y / 480 * 255), ((x + y) % 256)], axis=-1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "a.jpg", quality=95)
    path = str(tmp_path / "a.jpg")
    full = decode_ceiling.decode_and_crop(path, "pil", 32, 2, np.random.default_rng(1))
    draft = decode_ceiling.decode_and_crop(path, "pil_draft", 32, 2, np.random.default_rng(1))
    tensor = decode_ceiling.decode_and_crop(path, "decode_jpeg", 32, 2, np.random.default_rng(1))
    for a, b, t in zip(full, draft, tensor):
        assert a.shape == b.shape == (32, 32, 3) and tuple(t.shape) == (3, 32, 32)
        assert np.abs(a.astype(float) - b).mean() < 6
        assert np.abs(a.astype(float) - t.permute(1, 2, 0).numpy()).mean() < 6
    boxes = decode_ceiling.crop_boxes(640, 480, 3, rng)
    request = decode_ceiling.draft_request(640, 480, boxes, 32)
    scale = min(640 / request[0], 480 / request[1])  # the largest reduction draft may pick
    assert all(h / scale >= 32 - 1e-6 and w / scale >= 32 - 1e-6 for _, _, h, w in boxes)


def test_loader_throughput_records_an_unavailable_backend(tmp_path):
    data = make_image_folder(tmp_path / "images", classes=2, per_class=4)
    args = loader_throughput.parse_args(["--data", str(data), "--worker", "--backend", "nosuch", "--source",
                                         str(data), "--num-views", "1"])
    row = loader_throughput.measure(args)
    assert row["available"] is False and "nosuch" in row["reason"]


@pytest.mark.slow
def test_train_throughput_tiny(tmp_path):
    data = make_image_folder(tmp_path / "images", classes=2, per_class=8, size=(80, 60))
    out = tmp_path / "train"
    rc = train_throughput.main(["--data", str(data), "--arch", "resnet18", "--backends", "synthetic,torchvision",
                                "--batch-size", "4", "--image-size", "32", "--steps", "3", "--workers", "0",
                                "--threads", "1", "--out", str(out), "--profile", "--profile-steps", "2"])
    assert rc == 0
    results = _outputs(out, "train_throughput")["results"]
    for row in results:  # --profile: a run of its own per backend, waiting for data included
        parts = row["profile"]["parts_ms_per_step"]
        assert row["profile"]["steps"] == 2 and row["profile"]["loader"] == row["backend"]
        assert parts["data"] > 0 and parts["trunk"] > 0 and parts["subnetworks"] > 0
    assert (out / "train_throughput_parts.png").stat().st_size > 0
    assert [r["backend"] for r in results] == ["synthetic", "torchvision"]
    for row in results:
        assert row["available"] is True and row["memory_kind"]
        _positive(row, ["images_per_second", "ratio_to_synthetic", "updates", "batch_size", "timed_steps",
                        "train_wall_seconds"])
        # 3 warm-up steps (no workers: nothing prefetched), then >= 3 timed: 16 images of batch 4 take 2 epochs
        assert (row["prefetch_batches"], row["skipped_steps"]) == (0, 3)
        assert row["timed_steps"] == row["updates"] - 3 >= 3
        assert isinstance(row["peak_memory_bytes"], int) and row["peak_memory_bytes"] < _physical_memory()
    assert results[0]["ratio_to_synthetic"] == 1.0


def test_step_cost_pools_rounds():
    def run(times, peak):
        return {"method": "selfcon", "step_times_s": times, "step_time_median_s": sorted(times)[1],
                "images_per_second": 8 / sorted(times)[1], "peak_memory_bytes": peak, "load_average": [1.0, 1.0],
                "step_cpu_times_s": times}
    row = step_cost.merge([run([1.0, 2.0, 3.0], 100), run([4.0, 5.0, 6.0], 300)])
    assert row["step_time_median_s"] == 3.5 and row["peak_memory_bytes"] == 300 and row["rounds"] == 2
    assert row["images_per_second"] == pytest.approx(8 / 3.5) and row["step_cpu_time_median_s"] == 3.5
    assert "error" in step_cost.merge([run([1.0, 2.0, 3.0], 1), {"method": "selfcon", "error": "boom"}])


@pytest.mark.slow
def test_loss_scaling_tiny(tmp_path, capsys):
    out = tmp_path / "loss_scaling"
    rc = loss_scaling.main(["--batches", "64,128", "--views", "2", "--processes", "1,2", "--repeats", "2",
                            "--max-logits-gib", "0.0002", "--label", "now", "--out", str(out)])
    assert rc == 0
    rows = _outputs(out, "loss_scaling")["results"]
    assert [(r["processes"], r["batch"]) for r in rows] == [(1, 64), (1, 128), (2, 64), (2, 128)]
    skipped = [r for r in rows if "skipped" in r]
    assert [(r["processes"], r["batch"]) for r in skipped] == [(1, 128)]  # 256x256 floats > 0.0002 GiB
    for row in (r for r in rows if "skipped" not in r):
        _positive(row, ["time_median_s", "peak_memory_bytes", "logits_bytes"])
        assert len(row["times_s"]) == 2 and row["columns"] == 2
    two = [r for r in rows if r["processes"] == 2]
    # each process holds its own anchors' rows against the whole batch: half the logits of one process
    assert two[0]["logits_bytes"] == (32 * 2) * (64 * 2) * 4 == rows[0]["logits_bytes"] // 2
    again = loss_scaling.main(["--batches", "64", "--views", "2", "--processes", "1", "--repeats", "1",
                               "--compare", str(out / "loss_scaling.json"), "--out", str(tmp_path / "after")])
    assert again == 0 and "| now | 1 | 2 |" in (tmp_path / "after" / "loss_scaling.md").read_text()
