"""The training engine: Accelerate (devices, processes, precision, compile), the step, the epochs,
checkpoints and logging. Every method, loader and benchmark goes through this one step."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from fasttrain.engine import checkpoint
from fasttrain.faults import Stopped, deferred_stops, pending_stop
from fasttrain.files import write_bytes, write_json
from fasttrain.engine.knn import KNNMonitor
from fasttrain.engine.linear_eval import check_evaluation
from fasttrain.engine.metrics import MetricsFile, PeakMemory, Throughput
from fasttrain.engine.optim import build_optimizer, schedule_for, set_lr
from fasttrain.engine.profiling import StepProfiler, mark, parts_table, timed
from fasttrain.methods import Method, Objective, get_method
from fasttrain.models import MultiExitResNet, build_encoder
from fasttrain.monitors import CollapseWatch, NonFiniteLossError
from fasttrain.recipe import Recipe, RecipeError, dump_recipe, objective
from loaders import LoaderRequest, build_loader

log = logging.getLogger("fasttrain")
PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def make_accelerator(recipe: Recipe, *, log_with: Optional[Sequence[str]] = None) -> Accelerator:
    """``log_with``: the trackers (default ``run.trackers``; benchmarks and tests pass none)."""
    log_with = recipe.run.trackers if log_with is None else log_with
    for tracker in log_with:
        if importlib.util.find_spec(tracker) is None:
            raise RecipeError(f"run.trackers: {tracker} is not installed here (.venv/bin/pip install {tracker})")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "fasttrain" / "inductor"))
    if recipe.train.precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError("train.precision=fp16: needs a GPU (use bf16 or fp32 on CPU)")
    if recipe.train.precision == "bf16" and not torch.cuda.is_available() and not _native_cpu_bf16():
        log.warning("train.precision=bf16: this CPU has no native bf16 (AVX512-BF16/AMX); autocast emulates it, "
                    "many times slower than train.precision=fp32")
    try:
        accelerator = Accelerator(mixed_precision=PRECISION[recipe.train.precision],
                                  gradient_accumulation_steps=recipe.train.grad_accum_steps,
                                  dynamo_backend="inductor" if recipe.train.compile else "no",
                                  log_with=list(log_with) or None, project_dir=str(recipe.run.dir))
    except ValueError as exc:  # e.g. env:// rendezvous without MASTER_ADDR: a launch problem
        raise RecipeError(f"cannot start the process group: {exc}") from None
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = recipe.train.cudnn_benchmark
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if expected > 1 and accelerator.num_processes != expected:
        raise RecipeError(
            f"WORLD_SIZE={expected} but this process is alone in its group (num_processes="
            f"{accelerator.num_processes}): the launch did not form one process group. On a machine "
            f"without GPUs set ACCELERATE_USE_CPU=1 (with `accelerate launch --multi_gpu --num_processes N`, "
            f"torchrun or srun)")
    return accelerator


def _native_cpu_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True  # cannot tell: say nothing


SYNC_BN_COMPILE = ("model.sync_bn with train.compile: torch.compile breaks its graph at every SyncBatchNorm "
                   "(one per BatchNorm layer), which costs most of what compiling gains; turn one of them off")


def per_process_batch(recipe: Recipe, accelerator: Accelerator) -> int:
    parts = accelerator.num_processes * recipe.train.grad_accum_steps
    if recipe.train.batch_size % parts:
        raise RecipeError(f"train.batch_size={recipe.train.batch_size} is not divisible by processes x "
                          f"grad_accum_steps = {parts}")
    batch = recipe.train.batch_size // parts
    if batch < 2:
        raise RecipeError(f"train.batch_size={recipe.train.batch_size}: {batch} image per process and micro-step; "
                          f"BatchNorm needs at least 2")
    if get_method(recipe.method).mix and batch % 2:
        raise RecipeError(f"train.batch_size={recipe.train.batch_size}: {batch} images per process and micro-step; "
                          f"method={recipe.method} mixes image i with i + B/2 and needs an even number")
    return batch


def build_model(recipe: Recipe, method: Method, num_classes: int) -> MultiExitResNet:
    """The method's encoder; ``num_classes`` None builds it without classifiers (the random-init floor
    is a linear evaluation of the encoder alone)."""
    m = recipe.model
    classes = num_classes if method.classifiers != "none" else None
    return build_encoder(m.arch, stem=m.stem, exits=m.exits if method.uses_subnetwork else (),
                         exit_kind=m.exit_kind, proj_dim=m.proj_dim, head=m.head, width=m.width,
                         zero_init_residual=m.zero_init_residual, num_classes=classes,
                         exit_classifiers=bool(classes) and method.classifiers == "every_exit",
                         projection=method.contrastive)


def view_augments(recipe: Recipe, method: Method):
    """Each view's augmentation: data.view_augments, else the method's own, else data.augment for every view."""
    return recipe.data.view_augments or method.views or recipe.data.augment


def train_loader(recipe: Recipe, accelerator: Accelerator, method: Method):
    """The training split as the method needs it: its views, each with its augmentation."""
    return build_loader(recipe.loader, recipe.data, LoaderRequest(
        split="train", batch_size=per_process_batch(recipe, accelerator), augment=view_augments(recipe, method),
        num_views=method.num_views, device=accelerator.device, rank=accelerator.process_index,
        world_size=accelerator.num_processes, seed=recipe.train.seed, channels_last=recipe.train.channels_last))


def training_model(recipe: Recipe, method: Method, num_classes: int, num_processes: int, main: bool = True):
    """The model as it trains: channels_last, and SyncBatchNorm across several processes."""
    model = build_model(recipe, method, num_classes)
    if recipe.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if recipe.model.sync_bn and num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if recipe.train.compile and main:
            log.warning(SYNC_BN_COMPILE)
    return model


def build_step(recipe: Recipe, accelerator: Accelerator, method: Method, num_classes: int,
               schedule: Optional[Callable[[int], float]] = None) -> "TrainStep":
    """What a training step needs, from a recipe: the model as it trains, its optimizer, both prepared
    by Accelerate, and the step (a constant lr without ``schedule``). The trainer, the self-test and
    the benchmarks build their steps here."""
    model = training_model(recipe, method, num_classes, accelerator.num_processes, accelerator.is_main_process)
    optimizer = build_optimizer(model, recipe.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    return TrainStep(accelerator, model, objective(recipe), optimizer, schedule or (lambda update: 1.0),
                     clip_grad_norm=recipe.optim.clip_grad_norm)


class TrainStep:
    """One micro-step of training: forward (the method's batch builder), loss, backward, and on
    the last micro-step of an accumulation, the lr update and optimizer step.

    Nothing here waits for the device unless the step's logs are read (``measure``): an update whose
    loss was not finite on any process (in any of its micro-steps) is skipped by the optimizer
    itself, on the device (``found_inf``, as GradScaler does for fp16), and the skips are counted in
    device tensors that the trainer reads when it logs. An optimizer without ``found_inf`` support
    (timm's LARS) costs one host read per update instead."""

    def __init__(self, accelerator: Accelerator, model, objective: Objective, optimizer,
                 schedule: Callable[[int], float] = lambda update: 1.0, updates: int = 0,
                 clip_grad_norm: Optional[float] = None):
        """``schedule``: the lr factor of each update (``optim.schedule_for``); constant by default."""
        self.accelerator, self.model, self.objective, self.optimizer = accelerator, model, objective, optimizer
        self.schedule = schedule
        self.clip_grad_norm = clip_grad_norm
        self.updates = updates  # optimizer updates attempted (skipped ones too); the lr is derived from it
        self.lr = set_lr(optimizer, self.schedule(updates))
        device = accelerator.device
        zero = functools.partial(torch.zeros, (), dtype=torch.long, device=device)
        self.skipped, self.nonfinite_run, self.longest_run = zero(), zero(), zero()  # on the device
        self._pending = torch.zeros((), dtype=torch.bool, device=device)  # this accumulation saw a non-finite loss
        inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
        self._device_skip = bool(getattr(inner, "_step_supports_amp_scaling", False))

    def __call__(self, views, labels, measure: bool = False):
        """``measure``: this step's logs will be read, so include the per-exit terms and the gradient norm."""
        with self.accelerator.accumulate(self.model):
            loss, logs = self.objective(self.model, views, labels, detail=measure)
            self._nonfinite(loss)
            with mark("backward"):
                self.accelerator.backward(loss)
            with mark("optimizer"):
                if self.accelerator.sync_gradients:
                    skip, self._pending = self._pending, torch.zeros_like(self._pending)
                    if self.clip_grad_norm or measure:  # without clipping, the norm costs a pass only when logged
                        self._poison_if(skip)  # before clipping unscales: GradScaler checks the gradients there
                        logs["grad_norm"] = self.accelerator.clip_grad_norm_(self.model.parameters(),
                                                                             self.clip_grad_norm or float("inf"))
                    self.lr = set_lr(self.optimizer, self.schedule(self.updates))
                    self.updates += 1
                    self._step(skip)
                self.optimizer.zero_grad(set_to_none=True)
        logs["skipped_steps"] = self.skipped
        return loss.detach(), logs

    def resume_at(self, updates: int) -> None:
        """Continue a run after ``updates`` optimizer updates (its lr where the schedule has it)."""
        self.updates = updates
        self.lr = set_lr(self.optimizer, self.schedule(updates))

    def _nonfinite(self, loss: torch.Tensor) -> torch.Tensor:
        """Whether the loss is NaN/Inf on any process (a device tensor: an all-reduce, no host read);
        kept for the accumulation's update, and counted into the current run of such steps."""
        flag = (~torch.isfinite(loss.detach())).to(torch.long).reshape(1)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        flag = flag.reshape(()) > 0
        self._pending = self._pending | flag
        self.nonfinite_run = (self.nonfinite_run + 1) * flag
        self.longest_run = torch.maximum(self.longest_run, self.nonfinite_run)
        return flag

    def _poison_if(self, skip: torch.Tensor) -> None:
        """Under fp16 loss scaling, a gradient made NaN when ``skip``: GradScaler then skips the update
        (and lowers its scale) by its own device-side check."""
        if self.accelerator.scaler is None:
            return
        grad = next((p.grad for p in self.model.parameters() if p.grad is not None), None)
        if grad is not None:
            grad.view(-1)[:1].add_(torch.where(skip, float("nan"), 0.0))

    def _step(self, skip: torch.Tensor) -> None:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        scaler = self.accelerator.scaler
        if scaler is not None:
            self._poison_if(skip)  # a second NaN is harmless where clipping poisoned already
            scale = scaler._scale.clone() if scaler._scale is not None else None
            self.optimizer.step()
            if scale is not None:  # GradScaler lowers its scale exactly when it skipped the step
                skip = skip | (scaler._scale < scale)
        elif self._device_skip:
            inner.found_inf = skip.float()
            self.optimizer.step()
            del inner.found_inf
        elif not bool(skip):  # an optimizer that cannot skip on the device: one host read per update
            self.optimizer.step()
        self.skipped += skip.long()

    def take_skips(self) -> tuple[int, int]:
        """(updates skipped so far, the longest run of non-finite micro-steps since the last call): a
        host read, for logged steps and epoch ends."""
        skipped, longest = (int(x) for x in torch.stack([self.skipped, self.longest_run]).tolist())
        self.longest_run = self.nonfinite_run.clone()
        return skipped, longest


@dataclass
class TrainResult:
    model: torch.nn.Module
    method: Method
    epochs: int
    updates: int
    images_per_second: Optional[float]
    peak_memory_bytes: int
    peak_memory_kind: str
    device_memory_bytes: Optional[int]  # CUDA: the whole device's peak used memory (every allocator)
    skipped_images: int
    nonfinite_steps: int  # updates skipped: a NaN/Inf loss, or an fp16 overflow GradScaler skipped
    knn: list[dict]  # per evaluated epoch: {"epoch", <exit>: top-1 %, ..., "ensemble"}
    profile: Optional[dict] = None  # monitor.profile: ms per step of each part (profiling.PARTS)
    classes: Optional[list[str]] = None  # the class folders, in label order (None for a .beton, synthetic data)


def train(recipe: Recipe, accelerator: Accelerator) -> TrainResult:
    """Pretrain with ``recipe`` (resuming where ``run.resume`` says), checkpoints and logs included."""
    return Training(recipe, accelerator).run()


class Training:
    """One pretraining run: set up from the recipe (``__init__``), then epochs of steps (``run``), each
    logged every ``train.log_every`` steps and ended by a checkpoint, a stop, or the k-NN monitor."""

    def __init__(self, recipe: Recipe, accelerator: Accelerator):
        self.recipe, self.accelerator, self.main = recipe, accelerator, accelerator.is_main_process
        self.method = get_method(recipe.method)
        set_seed(recipe.train.seed, device_specific=True)
        self.run_dir = Path(recipe.run.dir)
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_bytes(self.run_dir / "recipe.yaml", dump_recipe(recipe).encode())
        self.loader = train_loader(recipe, accelerator, self.method)
        self.images_per_step = per_process_batch(recipe, accelerator) * accelerator.num_processes
        check_evaluation(recipe, self.method.evaluation, self.loader.num_samples * accelerator.num_processes)
        self._build_step()
        self._warn_if_few_positives()
        self._build_monitors()

    def _build_step(self) -> None:
        """Model, optimizer and TrainStep, resumed from a checkpoint where there is one."""
        recipe, accelerator, loader = self.recipe, self.accelerator, self.loader
        micro_steps = min(len(loader), recipe.train.max_steps_per_epoch or len(loader))
        updates_per_epoch = micro_steps // recipe.train.grad_accum_steps
        if updates_per_epoch == 0:
            raise RecipeError(f"train.grad_accum_steps={recipe.train.grad_accum_steps}: more than the "
                              f"{micro_steps} steps of an epoch")
        self.micro_steps = updates_per_epoch * recipe.train.grad_accum_steps
        self.step = build_step(recipe, accelerator, self.method, loader.num_classes,
                               schedule_for(recipe.schedule, recipe.optim.lr, updates_per_epoch))
        self.model, self.optimizer, self.loss_fn = self.step.model, self.step.optimizer, self.step.objective
        # every process loads the same checkpoint: the processes' weights stay equal
        self.start_epoch, self.start_step, updates, self.rng = _resume(recipe, _plain(accelerator, self.model),
                                                                       self.optimizer, accelerator, loader)
        self.step.resume_at(updates)
        self.num_exits = _plain(accelerator, self.model).num_exits

    def _warn_if_few_positives(self) -> None:
        contrast = self.images_per_step // (1 if self.recipe.loss.gather else self.accelerator.num_processes)
        share = self.loss_fn.anchors_with_positive(contrast, self.loader.num_classes)
        if share < 0.5 and self.main:
            log.warning("method=%s: with %d images per contrast and %d classes, only about %.0f%% of the anchors "
                        "have a positive (another image of their class); the rest add nothing to the loss. Raise "
                        "train.batch_size, or use a method with a second view or a sub-network", self.recipe.method,
                        contrast, self.loader.num_classes, 100 * share)

    def _build_monitors(self) -> None:
        recipe, accelerator = self.recipe, self.accelerator
        _start_trackers(recipe, accelerator)
        self.metrics = MetricsFile(self.run_dir, self.main, resume_step=self.step.updates or None)
        self.speed = Throughput(accelerator.device, skip=recipe.monitor.throughput_skip_steps)
        self.memory = PeakMemory(accelerator.device)
        self.memory.reset()
        monitor = recipe.monitor
        self.watch = CollapseWatch(monitor.collapse_threshold, monitor.collapse_patience,
                                   stop=monitor.on_collapse == "stop",
                                   loss_at_collapse=self.loss_fn.loss_at_collapse(self.images_per_step,
                                                                                  self.num_exits))
        self.knn = KNNMonitor.online(recipe, accelerator) if monitor.knn_every else None
        self.knn_curve = [{k: v for k, v in r.items() if k not in ("kind", "step")}
                          for r in self.metrics.read() if r["kind"] == "knn"]
        self.save = functools.partial(_save, recipe, accelerator, self.model, self.optimizer,
                                      classes=getattr(self.loader, "classes", None),
                                      train_images=self.loader.num_samples * accelerator.num_processes)
        self.profiler = _profiler(recipe, accelerator, self.model)
        self.skips = SkipWatch(recipe, self.step, self.main)
        self.stops = StopAgreement(accelerator)

    def run(self) -> TrainResult:
        # a stop signal ends the run at a step boundary, with a checkpoint of that step
        with deferred_stops(), self.profiler or contextlib.nullcontext():
            # a run stopped right after an epoch's checkpoint has not scored that epoch yet
            first = self.start_epoch
            if first and not self.start_step and self._knn_due(first) and first not in {
                    r["epoch"] for r in self.knn_curve}:
                self._knn(first)
            for epoch in range(first, self.recipe.schedule.epochs):
                self._epoch(epoch)
                self._end_of_epoch(epoch)
        self.accelerator.wait_for_everyone()
        loader, memory = self.loader, self.memory
        return TrainResult(_plain(self.accelerator, self.model), self.method, self.recipe.schedule.epochs,
                           self.step.updates, self.speed.images_per_second, memory.peak_bytes(), memory.kind,
                           memory.device_peak, len(loader.skipped), self.skips.check("the end of training"),
                           self.knn_curve, _profile_report(self.recipe, self.profiler),
                           getattr(loader, "classes", None))

    def _epoch(self, epoch: int) -> None:
        """The epoch's steps (from the resumed step, for the first), each followed by its log row, a
        step checkpoint or a stop where one is due."""
        self.model.train()
        first = self.start_step if epoch == self.start_epoch else 0
        self.loader.set_epoch(epoch, skip_batches=first)
        if epoch == self.start_epoch and self.rng is not None:
            checkpoint.set_rng_state(self.rng[self.accelerator.process_index % len(self.rng)])
        self.speed.resume()
        epochs = self.recipe.schedule.epochs
        with tqdm(total=self.micro_steps, initial=first, desc=f"epoch {epoch + 1}/{epochs}", disable=not self.main,
                  dynamic_ncols=True, leave=True) as bar:  # closed on any exception
            for index, (views, labels) in enumerate(timed(self.loader), start=first):
                if index == self.micro_steps:
                    break
                logged = (index + 1) % self.recipe.train.log_every == 0 or index + 1 == self.micro_steps
                _, logs = self.step(views, labels, measure=logged)
                self.speed.update(self.images_per_step)
                if self.profiler:
                    self.profiler.step()
                bar.update(1)
                if logged:
                    self._log(logs, epoch, index, bar)
                if index + 1 < self.micro_steps and self.accelerator.sync_gradients:
                    self._checkpoint_or_stop_mid_epoch(epoch, index)  # a stop waits for the accumulation's end
        self.speed.stop()

    def _log(self, logs: dict, epoch: int, index: int, bar) -> None:
        self.skips.check(f"epoch {epoch + 1} step {index + 1}/{self.micro_steps}")
        step = self.step
        row = _log_row(self.accelerator, logs, step, self.speed)
        spreads = "/".join(f"{row[k]:.2f}" for k in sorted(row) if k.startswith("spread/"))
        bar.set_postfix(loss=f"{row['loss']:.4f}", spread=spreads, lr=f"{step.lr:.3g}",
                        img_s=f"{row.get('images_per_second') or 0:.0f}")
        self.memory.sample()
        self.accelerator.log(row, step=step.updates)
        self.metrics.write({"kind": "train", "epoch": epoch + 1, "step": step.updates, **row})
        self.watch(row, step.updates)

    def _checkpoint_or_stop_mid_epoch(self, epoch: int, index: int) -> None:
        stop, every = self.stops.after_step(), self.recipe.run.checkpoint_every_steps
        if stop or (every and self.step.updates % every == 0):
            self.save(epoch, self.step.updates, step_in_epoch=index + 1)
        if stop:
            raise Stopped(stop, f" at epoch {epoch + 1} step {index + 1}/{self.micro_steps}: checkpoint "
                                f"written ({self.step.updates} updates); resume with run.resume=auto")

    def _end_of_epoch(self, epoch: int) -> None:
        self.skips.check(f"the end of epoch {epoch + 1}")
        stop, done = self.stops.now(), epoch + 1
        if stop or done == self.recipe.schedule.epochs or done % self.recipe.run.checkpoint_every == 0:
            self.save(done, self.step.updates)
        if stop:
            raise Stopped(stop, f" after epoch {done}: checkpoint written ({self.step.updates} updates); "
                                f"resume with run.resume=auto")
        if self._knn_due(done):
            self._knn(done)

    def _knn_due(self, epochs_done: int) -> bool:
        every = self.recipe.monitor.knn_every
        return bool(self.knn) and (epochs_done % every == 0 or epochs_done == self.recipe.schedule.epochs)

    def _knn(self, epochs_done: int) -> None:
        accuracy = self.knn(_plain(self.accelerator, self.model))
        self.knn_curve.append({"epoch": epochs_done, **accuracy})
        updates = self.step.updates
        self.accelerator.log({f"knn/{k}": v for k, v in accuracy.items()}, step=updates)
        self.metrics.write({"kind": "knn", "epoch": epochs_done, "step": updates, **accuracy})
        if self.main:
            tqdm.write(f"epoch {epochs_done}: k-NN top-1 " + ", ".join(f"{k} {v:.2f}%" for k, v in accuracy.items()))


def _profiler(recipe: Recipe, accelerator: Accelerator, model) -> Optional[StepProfiler]:
    """The main process's profiler when ``monitor.profile`` asks for one. A compiled model runs as one
    graph: its forward is not split into trunk, sub-networks and heads."""
    cfg = recipe.monitor.profile
    if cfg is None or not accelerator.is_main_process:
        return None
    return StepProfiler(accelerator.device, cfg.dir or Path(recipe.run.dir) / "profile", skip=cfg.skip,
                        steps=cfg.steps, model=None if recipe.train.compile else _plain(accelerator, model))


def _profile_report(recipe: Recipe, profiler: Optional[StepProfiler]) -> Optional[dict]:
    """profile.json and profile.md beside the trace, and the table on the console."""
    if profiler is None:
        return None
    cfg = recipe.monitor.profile
    if profiler.parts is None:
        log.warning("monitor.profile: the run ended before step %d, where the profiled window starts", cfg.skip + 1)
        return None
    if profiler.profiled_steps < cfg.steps:
        log.warning("monitor.profile: the run ended before step %d: %d of the %d steps asked for were profiled",
                    cfg.skip + cfg.steps, profiler.profiled_steps, cfg.steps)
    report = {"method": recipe.method, "arch": recipe.model.arch, "loader": recipe.loader,
              "device": profiler.device_kind, "steps": profiler.profiled_steps, "skip": cfg.skip,
              "compiled": recipe.train.compile, "trace": str(profiler.trace), "parts_ms_per_step": profiler.parts}
    table = parts_table([{"method": recipe.method, "parts": profiler.parts}], "method")
    write_json(profiler.out_dir / "profile.json", report)
    write_bytes(profiler.out_dir / "profile.md", table.encode())
    tqdm.write(f"where a step's time goes ({report['steps']} steps, {report['device']}; trace: {profiler.trace}):\n"
               + table)
    return report


def _start_trackers(recipe: Recipe, accelerator: Accelerator) -> None:
    """The recipe as flat hyper-parameters (``optim.lr``: 0.5); a W&B run named after run.dir and
    resumed with it, so a requeued job continues its curves."""
    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value if isinstance(value, (bool, int, float, str)) else str(value)
        return out

    run_name = Path(recipe.run.dir).resolve().name
    wandb_id = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(Path(recipe.run.dir).resolve()))[-64:]
    accelerator.init_trackers(recipe.run.project, config=flat(recipe.model_dump(mode="json")),
                              init_kwargs={"wandb": {"name": run_name, "id": wandb_id, "resume": "allow",
                                                     "dir": str(recipe.run.dir)}})


class SkipWatch:
    """Reads the step's skip counters where the host reads anyway (logged steps, epoch ends): warns
    of updates skipped since the last look, and stops the run once the loss was not finite for
    ``train.max_nonfinite_steps`` micro-steps in a row (noticed at the next look)."""

    def __init__(self, recipe: Recipe, step: TrainStep, main: bool):
        self.limit, self.step, self.main = recipe.train.max_nonfinite_steps, step, main
        self.seen = 0

    def check(self, where: str) -> int:
        skipped, longest = self.step.take_skips()
        if skipped > self.seen and self.main:
            tqdm.write(f"warning: {skipped - self.seen} update(s) skipped by {where} (loss not finite, or an fp16 "
                       f"overflow): {skipped} skipped so far")
        self.seen = skipped
        if longest >= self.limit:
            raise NonFiniteLossError(f"loss not finite for {longest} steps in a row (train.max_nonfinite_steps), "
                                     f"noticed at {where}")
        return skipped


def _plain(accelerator: Accelerator, model) -> MultiExitResNet:
    """The bare module (no DDP, no torch.compile wrapper): its state_dict keys match build_model's."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def _log_row(accelerator, logs: dict, step: TrainStep, speed: Throughput) -> dict:
    keys = sorted(logs)
    values = accelerator.reduce(torch.stack([logs[k].float() for k in keys]), reduction="mean")
    row = {k: float(v) for k, v in zip(keys, values.tolist())}
    row.update(lr=step.lr, images_per_second=speed.images_per_second)
    return row


class StopAgreement:
    """The stop signal any process received (0 if none), so that every process stops at the same step.

    Between steps the processes agree without waiting for the GPU or for each other: each step's
    flag is all-reduced (max) over a CPU (gloo) group in the background and read one step later,
    when it has long arrived; a stop is acted on one step after the signal, on every process alike.
    At epoch ends (``now``) the agreement is immediate."""

    def __init__(self, accelerator: Accelerator):
        self.world = accelerator.num_processes
        self.group = torch.distributed.new_group(backend="gloo") if self.world > 1 else None
        self.pending = None

    def after_step(self) -> int:
        if self.world == 1:
            return pending_stop() or 0
        agreed = self._collect()
        flag = torch.tensor([pending_stop() or 0])
        work = torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX, group=self.group, async_op=True)
        self.pending = (work, flag)
        return agreed

    def now(self) -> int:
        if self.world == 1:
            return pending_stop() or 0
        agreed = self._collect()
        flag = torch.tensor([pending_stop() or 0])
        torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX, group=self.group)
        return max(agreed, int(flag))

    def _collect(self) -> int:
        if self.pending is None:
            return 0
        work, flag = self.pending
        work.wait()
        self.pending = None
        return int(flag)


def _save(recipe: Recipe, accelerator: Accelerator, model, optimizer, epoch: int, updates: int,
          step_in_epoch: int = 0, classes: Optional[list[str]] = None, train_images: Optional[int] = None) -> None:
    """``epoch`` epochs and ``step_in_epoch`` micro-steps of the next are done; every process's RNG
    state is kept, so a resumed run continues the same random stream."""
    rng = gather_object([checkpoint.rng_state()])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"model": _plain(accelerator, model).state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch, "step_in_epoch": step_in_epoch, "rng": rng,
                 "updates": updates, "method": recipe.method, "arch": recipe.model.arch,
                 "recipe": recipe.model_dump(mode="json"), "classes": list(classes) if classes else None,
                 "train_images": train_images}
        if accelerator.scaler is not None:
            state["scaler"] = accelerator.scaler.state_dict()
        checkpoint.save_kept(state, Path(recipe.run.dir), recipe.run.keep_last)


def _check_same_run(recipe: Recipe, state: dict, path: Path, processes: int, loader) -> None:
    """A resume continues the run it resumes: the same global batch, number of processes (each restores
    its own RNG stream) and dataset (classes and size), or the epoch position and schedule would no
    longer mean what they did. ``run.resume_changes: true`` accepts a change, with a warning."""
    was = {"train.batch_size": state["recipe"].get("train", {}).get("batch_size"),
           "processes": len(state["rng"]) if state.get("rng") else None,
           "classes": state.get("classes"), "training images": state.get("train_images")}
    now = {"train.batch_size": recipe.train.batch_size, "processes": processes,
           "classes": getattr(loader, "classes", None), "training images": loader.num_samples * processes}
    changed = [f"{key} {was[key] if key != 'classes' else len(was[key])} -> "
               f"{now[key] if key != 'classes' else len(now[key] or ())}"
               + (" (other class folders)" if key == "classes" else "")
               for key in was if was[key] is not None and now[key] is not None and was[key] != now[key]]
    if not changed:
        return
    what = f"run.resume: {path} was trained with another setting: {'; '.join(changed)}"
    if not recipe.run.resume_changes:
        raise RecipeError(f"{what}; resume with the same settings, or set run.resume_changes=true if the change "
                          f"is meant")
    log.warning("%s (accepted: run.resume_changes)", what)


def _resume(recipe: Recipe, model, optimizer, accelerator: Accelerator, loader):
    """(epoch, micro-step in that epoch, updates, per-process RNG states or None) to start from."""
    if recipe.run.resume == "never":
        return 0, 0, 0, None
    if recipe.run.resume == "auto":
        path, state = checkpoint.load_newest_good(Path(recipe.run.dir), "run.resume")
        if path is None:
            return 0, 0, 0, None
    else:
        path = Path(recipe.run.resume)
        if not path.is_file():
            raise RecipeError(f"run.resume: no such checkpoint: {path}")
        state = checkpoint.load(path, "run.resume")
    if (state["method"], state["arch"]) != (recipe.method, recipe.model.arch):
        raise RecipeError(f"run.resume: {path} holds {state['method']}/{state['arch']}, the recipe asks for "
                          f"{recipe.method}/{recipe.model.arch}")
    _check_same_run(recipe, state, path, accelerator.num_processes, loader)
    checkpoint.load_weights(model, state, f"run.resume: {path}")
    optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    position = (state["epoch"], state.get("step_in_epoch", 0), state["updates"], state.get("rng"))
    if accelerator.is_main_process:
        log.info("resumed from %s at epoch %d step %d (%d updates)", path, position[0] + (position[1] > 0),
                 position[1], position[2])
    return position
