import math

import pytest
import torch

from fasttrain.engine.optim import build_optimizer, lr_factor, set_lr
from fasttrain.engine.trainer import TrainStep, build_model, make_accelerator
from fasttrain.methods import get_method
from fasttrain.recipe import OptimConfig, Recipe, objective


def small_recipe(tmp_path, method="selfcon", **train):
    return Recipe.model_validate({"method": method, "model": {"arch": "resnet18", "stem": "cifar", "proj_dim": 8},
                                  "train": {"precision": "fp32", "channels_last": False, **train},
                                  "run": {"dir": str(tmp_path)}})


def test_warmup_then_cosine_to_the_final_ratio():
    total, warmup, final = 100, 10, 1e-3
    factors = [lr_factor(u, total, warmup, final) for u in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))  # rising during warm-up
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # then falling
    assert factors[55] == pytest.approx(final + (1 - final) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(total, total, warmup, final) == pytest.approx(final)


def test_step_decay_multiplies_by_gamma_at_each_milestone_after_the_warm_up():
    factors = [lr_factor(u, 90, 2, 0.0, milestones=[30, 60], gamma=0.1) for u in range(90)]
    assert factors[:2] == [0.5, 1.0] and factors[2:30] == [1.0] * 28
    assert factors[30:60] == pytest.approx([0.1] * 30) and factors[60:] == pytest.approx([0.01] * 30)


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_batchnorm_and_bias_excluded_from_weight_decay(name):
    model = build_model(Recipe(method="supcon", model={"arch": "resnet18"}), get_method("supcon"), 10)
    optimizer = build_optimizer(model, OptimConfig(name=name, weight_decay=1e-4))
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for param_name, param in model.named_parameters():
        assert (id(param) in decay) == (param.ndim > 1), param_name
    if name == "lars":  # timm's LARS adapts only groups with weight decay unless always_adapt
        assert not any(g["always_adapt"] for g in optimizer.param_groups)
    everything = build_optimizer(model, OptimConfig(name=name, exclude_bn_bias=False))
    assert all(g["weight_decay"] > 0 for g in everything.param_groups)
    set_lr(optimizer, 0.5)
    assert all(g["lr"] == pytest.approx(0.25) for g in optimizer.param_groups)  # base lr 0.5 x 0.5


def test_gradient_accumulation_steps_the_optimizer_every_k_micro_steps(tmp_path):
    recipe = small_recipe(tmp_path, "ce", grad_accum_steps=2, batch_size=8)
    accelerator = make_accelerator(recipe, log_with=())
    method = get_method("ce")
    model = build_model(recipe, method, 3)
    optimizer = build_optimizer(model, recipe.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = TrainStep(accelerator, model, objective(recipe), optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    views, labels = (torch.randn(4, 3, 16, 16),), torch.tensor([0, 0, 1, 1])
    step(views, labels)
    assert step.updates == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    step(views, labels)
    assert step.updates == 1 and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_gradient_accumulation_of_a_contrastive_loss_is_refused_naming_the_keys(tmp_path):
    with pytest.raises(ValueError, match="train.grad_accum_steps=2: a contrastive loss needs every feature"):
        small_recipe(tmp_path, "supcon", grad_accum_steps=2, batch_size=8)


def test_fp16_on_cpu_is_refused_with_the_key(tmp_path):
    from fasttrain.recipe import RecipeError
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a GPU")
    with pytest.raises(RecipeError, match="train.precision=fp16"):
        make_accelerator(small_recipe(tmp_path, precision="fp16"), log_with=())


def test_throughput_starts_after_skip_steps_and_stops_at_stop(monkeypatch):
    from fasttrain.engine import metrics
    clock = iter([10.0, 12.0, 20.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    speed = metrics.Throughput(torch.device("cpu"), skip=2)
    speed.update(8)
    speed.update(8)  # t=10: the clock starts; these first 2 steps are not counted
    assert speed.images_per_second is None
    for _ in range(3):
        speed.update(8)
    speed.stop()  # t=12: 24 images in 2 s
    assert speed.images_per_second == pytest.approx(12.0)
    assert speed.images_per_second == pytest.approx(12.0)  # reading it later changes nothing


def test_metrics_file_starts_fresh_or_keeps_the_rows_up_to_the_resumed_step(tmp_path):
    from fasttrain.engine.metrics import MetricsFile
    first = MetricsFile(tmp_path, True)
    for step in (1, 2, 3, 4):
        first.write({"kind": "train", "epoch": 1, "step": step, "loss": float(step)})
    first.write({"kind": "knn", "epoch": 1, "step": 4, "backbone": 50.0})
    resumed = MetricsFile(tmp_path, True, resume_step=2)  # the checkpoint was at step 2: 3 and 4 are redone
    assert [(r["kind"], r["step"]) for r in resumed.read()] == [("train", 1), ("train", 2)]
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 1 + 2  # header + one value per row
    assert MetricsFile(tmp_path, True).read() == []  # a fresh run: nothing of an older run is mixed in


def test_sync_bn_under_compile_is_one_warning_and_sync_bn_needs_several_processes(caplog):
    from fasttrain.engine.trainer import SYNC_BN_COMPILE, training_model
    recipe = Recipe(method="selfcon", model={"arch": "resnet18", "sync_bn": True}, train={"compile": True})
    alone = training_model(recipe, get_method("selfcon"), 10, num_processes=1)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in alone.modules()) and not caplog.records
    with caplog.at_level("WARNING", logger="fasttrain"):
        several = training_model(recipe, get_method("selfcon"), 10, num_processes=2)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in several.modules())
    assert [r.getMessage() for r in caplog.records] == [SYNC_BN_COMPILE]
    plain = Recipe(method="selfcon", model={"arch": "resnet18", "sync_bn": True})
    caplog.clear()
    training_model(plain, get_method("selfcon"), 10, num_processes=2)
    assert not caplog.records


def test_device_constants_are_built_once_per_device():
    from fasttrain.losses import _index
    cpu = torch.device("cpu")
    assert _index((0, 2), cpu) is _index((0, 2), cpu)


def test_peak_memory_samples_the_whole_cuda_device(monkeypatch):
    """On a GPU the comparable number across loaders is the device's used memory (DALI's pool is
    outside torch's allocator): the maximum of total - free over the samples; nothing on CPU."""
    from fasttrain.engine.metrics import PeakMemory
    readings = iter([(70, 100), (40, 100), (55, 100)])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: next(readings))
    memory = PeakMemory(torch.device("cuda", 0))
    for _ in range(3):
        memory.sample()
    assert memory.device_peak == 60
    cpu = PeakMemory(torch.device("cpu"))
    cpu.reset()
    cpu.sample()
    assert cpu.device_peak is None


def _host_reads(method: str, **recipe_overrides) -> dict:
    import argparse

    from benchmarks.host_syncs import count
    args = argparse.Namespace(arch="resnet18", width=8, image_size=16, batch_size=8, precision="fp32", warmup=1,
                              steps=2, overrides=recipe_overrides)
    return count(method, args)


@pytest.mark.parametrize("method", ["ce", "supcon", "supcon_s", "selfcon", "selfcon_m", "dsn", "cds", "simclr",
                                    "selfcon_su", "mixco"])
def test_a_step_whose_logs_are_not_read_makes_no_host_read(method):
    """No .item()/bool()/float()/.tolist() of a tensor and no data-dependent shape (torch.unique, bincount)
    in a step whose logs are not read: each would stall the GPU queue, every step."""
    row = _host_reads(method)
    assert row["python_reads"] == {}, row["python_reads"]


def test_the_host_read_counter_sees_reads_and_lars_costs_one_per_update():
    from collections import Counter

    from benchmarks.host_syncs import counting_reads
    with counting_reads(Counter()) as seen:
        torch.ones(2).sum().item()
        torch.unique(torch.tensor([1, 1, 2]))
    assert sum(seen.values()) == 2
    # timm's LARS cannot skip an update on the device: the skip decision is one read per update
    row = _host_reads("selfcon", optim={"name": "lars"})
    assert sum(row["python_reads"].values()) == row["steps"], row["python_reads"]


def test_the_epoch_schedule_is_the_official_supcon_selfcon_schedule():
    """SupCon/SelfCon util.py: cosine per epoch over all epochs (1-indexed, eta_min = lr/1000), and for
    the first warm_epochs a per-iteration warm-up from the absolute lr 0.01 to the cosine at warm_epochs."""
    from fasttrain.engine.optim import schedule_for
    from fasttrain.recipe import ScheduleConfig
    lr, epochs, warm, n = 0.5, 20, 3, 4
    cfg = ScheduleConfig(epochs=epochs, warmup_epochs=warm, final_lr_ratio=1e-3, granularity="epoch",
                         warmup_start_lr=0.01)
    ours = schedule_for(cfg, lr, n)
    eta_min = lr * 0.1 ** 3
    cosine = lambda e: eta_min + (lr - eta_min) * (1 + math.cos(math.pi * e / epochs)) / 2  # noqa: E731
    for epoch in range(1, epochs + 1):
        for batch in range(n):
            official = cosine(epoch)
            if epoch <= warm:
                p = (batch + (epoch - 1) * n) / (warm * n)
                official = 0.01 + p * (cosine(warm) - 0.01)
            assert ours((epoch - 1) * n + batch) * lr == pytest.approx(official, rel=1e-12), (epoch, batch)


def test_the_epoch_schedule_reproduces_mixcos_flat_then_truncated_cosine():
    """MixCo simclr/pretrain.py: CosineAnnealingLR(T_max=100, eta_min=0) stepped after each epoch
    from epoch 10 on (0-indexed): 11 epochs at the base lr, then a cosine cut off at step 89."""
    from fasttrain.engine.optim import schedule_for
    from fasttrain.recipe import ScheduleConfig
    cfg = ScheduleConfig(epochs=100, warmup_epochs=11, warmup_start_lr=0.15, final_lr_ratio=0.0,
                         granularity="epoch", cosine_offset_epochs=11, cosine_epochs=100)
    ours = schedule_for(cfg, 0.15, 3)
    for epoch in range(100):
        steps = max(0, epoch - 10)
        official = 0.15 * (1 + math.cos(math.pi * steps / 100)) / 2
        assert ours(epoch * 3 + 1) * 0.15 == pytest.approx(official, rel=1e-12, abs=1e-15), epoch
