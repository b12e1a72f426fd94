"""Recipes: YAML files validated against this schema before any work starts.

    recipe = load_recipe("recipes/r50_selfcon.yaml", ["train.batch_size=512", "loader=dali"])

An unknown key, a wrong type or an impossible value raises RecipeError with one line that names
the key; ``key=value`` overrides use dotted keys and YAML values, typed by the schema.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from fasttrain.errors import RecipeError
from fasttrain.methods import LOSS_OPTIONS, METHODS, Objective
from fasttrain.models import ARCHS, EXIT_KINDS, EXIT_POINTS, HEADS, STEMS
from loaders import BACKENDS, unsupported
from loaders.spec import DataConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # optim.lr=inf is no setting


class ModelConfig(_Strict):
    arch: Literal[tuple(ARCHS)] = "resnet50"
    stem: Literal[STEMS] = "imagenet"
    exits: list[Literal[EXIT_POINTS]] = ["layer2"]  # used only by methods with a sub-network
    exit_kind: Literal[tuple(EXIT_KINDS)] = "fc"
    width: int = Field(64, gt=0)  # channels of the stem and layer1 (torchvision's 64); stage i has width * 2**i
    proj_dim: int = Field(128, gt=0)
    # projection head: Linear-BN-ReLU-Linear (default: the official Linear-ReLU-Linear, `mlp`, collapses on
    # small data, see docs/collapse.md), or `linear`
    head: Literal[tuple(HEADS)] = "mlp_bn"
    sync_bn: bool = False
    zero_init_residual: bool = False


class _LossSettings(_Strict):
    # default: the method's, as its paper's official code (SupCon family 0.1 / 0.07; CDS 0.07 / 0.07;
    # SimCLR and MixCo 0.5, no base-temperature rescaling)
    temperature: Optional[float] = Field(None, gt=0)
    base_temperature: Optional[float] = Field(None, gt=0)
    # contrast against the batch of every process (False: each process's own batch, as the official CDS
    # ImageNet and MixCo code do; the effective batch then depends on the number of processes)
    gather: bool = True
    label_smoothing: float = Field(0.0, ge=0, lt=1)


# the settings some methods read (alpha, aux_weight, ...), declared once in methods.LOSS_OPTIONS
LossConfig = create_model("LossConfig", __base__=_LossSettings, **{
    name: (Optional[float], Field(None, description=option.doc, **({"gt": 0} if option.positive else {"ge": 0})))
    for name, option in LOSS_OPTIONS.items()})


class OptimConfig(_Strict):
    name: Literal["sgd", "lars"] = "sgd"
    lr: float = Field(0.5, gt=0)  # for the global batch (no hidden scaling)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0)
    exclude_bn_bias: bool = True  # no weight decay / LARS adaptation on BatchNorm and bias
    lars_trust_coeff: float = Field(0.001, gt=0)
    clip_grad_norm: Optional[float] = Field(None, gt=0)  # clip the global gradient norm to this value


class ScheduleConfig(_Strict):
    epochs: int = Field(100, gt=0)
    warmup_epochs: float = Field(10, ge=0)
    kind: Literal["cosine", "step"] = "cosine"  # after the warm-up
    final_lr_ratio: float = Field(1e-3, ge=0, le=1)  # cosine ends at lr * final_lr_ratio
    milestones: list[int] = []  # step: the lr is multiplied by gamma at each of these epochs
    gamma: float = Field(0.1, gt=0, le=1)
    # update: the lr changes every update; epoch: once per epoch, the warm-up still per update, and the
    # cosine counts the warm-up's epochs (the official SupCon/SelfCon code)
    granularity: Literal["update", "epoch"] = "update"
    warmup_start_lr: Optional[float] = Field(None, ge=0)  # absolute lr of the warm-up's first update (default 0)
    cosine_offset_epochs: float = Field(0, ge=0)  # epoch: epochs the cosine clock leaves out at the start
    cosine_epochs: Optional[int] = Field(None, gt=0)  # epoch: the cosine's length (default: epochs)

    @model_validator(mode="after")
    def _steps(self):
        if self.kind == "step" and not self.milestones:
            raise ValueError("schedule.kind=step needs schedule.milestones (epochs), e.g. [30, 60]")
        if self.kind == "cosine" and self.milestones:
            raise ValueError(f"schedule.milestones={self.milestones}: read only with schedule.kind=step")
        if self.granularity == "update" and (self.cosine_offset_epochs or self.cosine_epochs):
            raise ValueError("schedule.cosine_offset_epochs and schedule.cosine_epochs are read only with "
                             "schedule.granularity=epoch")
        if self.granularity == "epoch" and self.warmup_epochs != int(self.warmup_epochs):
            raise ValueError(f"schedule.warmup_epochs={self.warmup_epochs}: whole epochs with "
                             "schedule.granularity=epoch")
        if any(not 0 < m < self.epochs for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"schedule.milestones={self.milestones}: increasing epochs within (0, "
                             f"{self.epochs})")
        return self


class TrainConfig(_Strict):
    batch_size: int = Field(1024, gt=0)  # global: summed over processes and accumulation steps
    grad_accum_steps: int = Field(1, gt=0)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    channels_last: bool = True
    compile: bool = False
    cudnn_benchmark: bool = True  # CUDA: let cuDNN pick the fastest kernels for the fixed input shapes
    seed: int = 0
    max_steps_per_epoch: Optional[int] = Field(None, gt=0)  # short runs: tests, smoke checks
    log_every: int = Field(10, gt=0)
    max_nonfinite_steps: int = Field(10, gt=0)  # a NaN/Inf loss skips its update; this many in a row stop the run


class LinearEvalConfig(_Strict):
    enabled: bool = True
    epochs: int = Field(10, gt=0)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(256, gt=0)  # global
    cache_features: bool = False  # encode the train split once (center crops) instead of every epoch
    milestones: list[int] = []  # epochs where the lr is multiplied by gamma (empty: a cosine to 0)
    gamma: float = Field(0.1, gt=0, le=1)
    crop_scale: Optional[tuple[float, float]] = None  # the training crops' scale range (default: data.crop_scale)

    @model_validator(mode="after")
    def _steps(self):
        if any(not 0 < m < self.epochs for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"linear_eval.milestones={self.milestones}: increasing epochs within (0, {self.epochs})")
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"linear_eval.crop_scale={list(self.crop_scale)} must satisfy 0 < min <= max <= 1")
        return self


class ProfileConfig(_Strict):
    """A torch.profiler window over training steps (fasttrain/engine/profiling.py), on the main process."""

    skip: int = Field(5, ge=0)  # steps before the window: compilation, warm-up, the loader's queue
    steps: int = Field(5, gt=0)  # steps profiled
    dir: Optional[Path] = None  # trace, profile.json and profile.md; default: run.dir/profile


class MonitorConfig(_Strict):
    """Signals that a run learns: k-NN accuracy per exit at epoch ends, collapse of the projections."""

    knn_every: int = Field(1, ge=0)  # epochs between k-NN evaluations (and after the last); 0: never
    knn_bank: Optional[int] = Field(10_000, gt=0)  # train images in the feature bank (None: all)
    knn_val: Optional[int] = Field(10_000, gt=0)  # validation images scored (None: all)
    knn_k: int = Field(20, gt=0)
    knn_temperature: float = Field(0.07, gt=0)
    collapse_threshold: float = Field(0.1, ge=0)  # spread (std of normalised projections x sqrt(dim)) below: collapse
    collapse_patience: int = Field(100, gt=0)  # steps a run may sit collapsed before the warning (or the stop)
    on_collapse: Literal["warn", "stop"] = "warn"
    # steps left out of the run's images/s: compilation, warm-up, and batches the loader decoded ahead
    throughput_skip_steps: int = Field(2, ge=0)
    profile: Optional[ProfileConfig] = None  # where a step's time goes, part by part


TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "trackio", "swanlab")


class RunConfig(_Strict):
    dir: Path = Path("runs/default")
    resume: Union[Literal["auto", "never"], Path] = "auto"
    checkpoint_every: int = Field(1, gt=0)  # epochs; the last epoch always checkpoints
    checkpoint_every_steps: Optional[int] = Field(None, gt=0)  # optimizer updates, mid-epoch too
    resume_changes: bool = False  # accept resuming with another batch size, process count or dataset
    keep_last: int = Field(1, gt=0)  # > 1: also keep checkpoint-<updates>.pt, the newest N (resume falls back)
    # signals that stop training at the next step with a checkpoint of it; exit status 128 + signal number
    stop_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGXCPU"]] = ["SIGTERM", "SIGUSR1"]
    # Accelerate trackers fed the per-step metrics and the k-NN curve; [] for none (wandb: pip extra)
    trackers: list[Literal[TRACKERS]] = ["tensorboard"]
    project: str = "fasttrain"  # the trackers' project name (W&B project); the run is named after run.dir


class Recipe(_Strict):
    method: Literal[tuple(METHODS)]
    loader: Literal[tuple(BACKENDS)] = "torchvision"
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    linear_eval: LinearEvalConfig = LinearEvalConfig()
    monitor: MonitorConfig = MonitorConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _consistent(self):
        method = METHODS[self.method]
        objective(self)  # the method checks its own loss settings
        if method.contrastive and self.train.grad_accum_steps > 1:
            raise ValueError(f"train.grad_accum_steps={self.train.grad_accum_steps}: a contrastive loss needs every "
                             f"feature of the global batch in one loss (method={self.method}); use more processes "
                             f"or a smaller train.batch_size")
        views = self.data.view_augments
        if views is not None and len(views) != method.num_views:
            raise ValueError(f"data.view_augments={list(views)}: method={self.method} has {method.num_views} view(s)")
        scales = self.data.view_crop_scales
        if scales is not None and len(scales) != method.num_views:
            raise ValueError(f"data.view_crop_scales={[list(s) for s in scales]}: method={self.method} has "
                             f"{method.num_views} view(s)")
        key = (f"data.view_augments={list(views)}" if views else f"method={self.method} (its views)" if method.views
               else f"data.augment={self.data.augment}")
        why = unsupported(self.loader, self.data, views or method.views or (self.data.augment,), key)
        if why:
            raise ValueError(why)
        if method.uses_subnetwork and not self.model.exits:
            raise ValueError(f"model.exits is empty but method={self.method} needs a sub-network exit")
        step_batch = self.train.batch_size % self.train.grad_accum_steps
        if step_batch:
            raise ValueError(f"train.batch_size={self.train.batch_size} is not divisible by "
                             f"train.grad_accum_steps={self.train.grad_accum_steps}")
        return self


def objective(recipe: Recipe) -> Objective:
    loss = recipe.loss
    return Objective(METHODS[recipe.method], temperature=loss.temperature, base_temperature=loss.base_temperature,
                     label_smoothing=loss.label_smoothing, gather=loss.gather,
                     **{name: getattr(loss, name) for name in LOSS_OPTIONS})


def apply_override(tree: dict, assignment: str) -> None:
    """``a.b.c=value`` sets tree['a']['b']['c'] to the YAML value."""
    if "=" not in assignment:
        raise RecipeError(f"override {assignment!r}: expected key=value")
    key, _, text = assignment.partition("=")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def describe_error(error: ValidationError) -> str:
    """A schema error as one line: the key, what is wrong, the value given."""
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if first["type"] == "missing":
        return f"{key}: required key is missing"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    message = first["msg"].removeprefix("Value error, ")
    more = f" [and {len(error.errors()) - 1} more]" if len(error.errors()) > 1 else ""
    return f"{key}: {message}{shown}{more}" if key else f"{message}{more}"  # a whole-recipe check names its keys


def _merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error, not "the last wins", and
    aliases (``*name``) are refused: nested ones expand exponentially (a few hundred bytes can ask for
    billions of values), and ``base:`` is how recipes share settings."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"the alias *{event.anchor} (recipes share settings "
                                              f"with base:, not YAML aliases)", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read(path: Path, chain: tuple = ()) -> dict:
    """A recipe file as a dict; ``base: other.yaml`` (relative to the file) is read first and
    overridden key by key, so the ImageNet recipes share one set of defaults."""
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    if path.resolve() in chain:
        raise RecipeError(f"{path}: `base:` loops back to itself")
    try:
        tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections")
    base = tree.pop("base", None)
    if base is None:
        return tree
    return _merge(_read(path.parent / str(base), chain + (path.resolve(),)), tree)


def load_recipe(path: Union[str, Path], overrides: Sequence[str] = ()) -> Recipe:
    path = Path(path)
    return recipe_from_tree(_read(path), overrides, where=str(path))


def recipe_from_tree(tree: dict, overrides: Sequence[str] = (), *, where: str = "recipe") -> Recipe:
    """A recipe from its sections as a dict (a copy is changed by ``overrides``); RecipeError names ``where``."""
    tree = copy.deepcopy(tree)
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        raise RecipeError(f"{where}: {describe_error(exc)}") from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
