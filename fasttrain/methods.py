"""Methods: a name maps to a declaration (views per image, exits, heads, the loss, the evaluation).
This module is also the batch builder, the only place that knows what a forward batch holds:

    single view -> one [B] forward;   two views -> both views concatenated into one [2B] forward;
    mix-up (MixCo) -> the views, then per view the B/2 mixes of image i with image i + B/2.

Nothing else differs between methods, so a benchmark that swaps the method measures only what
the method really needs. A method's loss is a function of the encoder's output; the trainer never
branches on the method.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, NamedTuple, Optional, Sequence

import torch

from fasttrain.tracing import mark
from fasttrain.losses import cross_entropy, masked_mean, mix_contrast_loss, supcon_loss, supcon_terms
from fasttrain.models import EncoderOutput, exit_names
from fasttrain.monitors import collapse_value, spread


class Layout(NamedTuple):
    """What the forward batch holds, beside the images: the number of views, and for mix-up the
    weight of the first source of each mix (``[V, B/2]``: drawn per view, as the official code)."""
    views: int
    mix_lambda: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class LossOption:
    """A loss setting beyond the temperatures that some methods read (``loss.<name>`` in a recipe).
    Declared here once: the recipe's schema, the check that a method reads it, and the default all
    follow from this table and the methods' ``options``."""
    doc: str
    positive: bool = False  # > 0; else >= 0


LOSS_OPTIONS = {
    "alpha": LossOption("paper Eq. 7: L = (L_sup(backbone) + alpha L_self(sub-networks)) / (1 + alpha)"),
    "aux_weight": LossOption("dsn: each exit's cross-entropy weight; cds: lambda, each exit's contrast weight"),
    "mix_temperature": LossOption("mixco: the mix-up term's temperature (default: loss.temperature)", positive=True),
    "mix_weight": LossOption("mixco: the mix-up term's weight"),
}


LossFn = Callable[["Objective", EncoderOutput, torch.Tensor, Layout, bool], "tuple[torch.Tensor, dict]"]


@dataclass(frozen=True)
class Method:
    name: str
    num_views: int
    uses_subnetwork: bool  # exits at recipe model.exits
    loss: LossFn  # (objective, encoder output, labels, layout, detail) -> (loss, logs); detail: per-exit logs too
    contrastive: bool  # a contrastive term: every feature of the global batch in one loss (no accumulation)
    classifiers: Literal["none", "backbone", "every_exit"]  # trained jointly with the encoder
    evaluation: Literal["linear", "classifier"]  # linear: frozen encoder; classifier: the trained ones (1-stage)
    summary: str
    # the LOSS_OPTIONS it reads, with their defaults (None: unset unless the recipe sets it)
    options: Mapping[str, Optional[float]] = field(default_factory=dict)
    labels: bool = True  # False: labels never reach the loss (self-supervised)
    views: Optional[tuple[str, ...]] = None  # each view's augmentation; None: data.augment for every view
    mix: bool = False  # the batch builder appends mix-ups of each view (MixCo)
    # the temperatures its paper's official code uses (loss.temperature / loss.base_temperature override
    # them); base_temperature None: the same as temperature (NT-Xent, no rescaling)
    temperature: float = 0.1
    base_temperature: Optional[float] = 0.07

    @property
    def forward_images_per_image(self) -> float:
        """Images through the encoder per image of the batch (build_batch): the views, and for
        mix-up the B/2 mixes of each view."""
        return self.num_views * (1.5 if self.mix else 1)


def _ce(obj: "Objective", out: EncoderOutput, labels, layout: Layout, detail: bool):
    loss = cross_entropy(out.logits, labels, obj.label_smoothing)
    if not detail:
        return loss, {"loss": loss.detach()}
    top1 = (out.logits.detach().argmax(1) == labels).float().mean()
    return loss, {"loss": loss.detach(), "train_top1": top1, "spread/backbone": spread(out.logits)}


def _supcon_family(obj: "Objective", out: EncoderOutput, labels, layout: Layout, detail: bool):
    """SupCon, SupCon-S, SelfCon, SelfCon-M, SimCLR: one supcon_loss over every (view, exit) column;
    with loss.alpha, paper Eq. 7: backbone anchors contrast backbone features only (for the
    self-supervised SelfCon, the rule of the paper's Appendix C.2)."""
    num_exits = len(out.projections)
    features = stack_exits(out.projections, layout.views)
    labels = obj.contrast_labels(labels)
    columns = range(features.shape[1])
    backbone = [c for c in columns if c % num_exits == num_exits - 1]
    subnet = [c for c in columns if c % num_exits != num_exits - 1]
    terms = dict(temperature=obj.temperature, base_temperature=obj.base_temperature, gather=obj.gather)
    alpha = obj.options.get("alpha")
    if alpha is None:
        per_anchor, valid = supcon_terms(features, labels, **terms)
        loss = masked_mean(per_anchor, valid, obj.gather)
        logs = {f"loss/{name}": masked_mean(per_anchor[:, e::num_exits].detach(), valid[:, e::num_exits], obj.gather)
                for e, name in enumerate(exit_names(num_exits))} if detail else {}
    else:  # L = 1/(1+a) L_sup(backbone) + a/(1+a) L_self(all exits, sub-network anchors)
        sup, sup_valid = supcon_terms(features[:, backbone], labels, **terms)
        sub, sub_valid = supcon_terms(features, labels, anchor_views=subnet, **terms)
        sup, sub = masked_mean(sup, sup_valid, obj.gather), masked_mean(sub, sub_valid, obj.gather)
        loss = (sup + alpha * sub) / (1 + alpha)
        logs = {"loss/backbone": sup.detach(), "loss/subnetworks": sub.detach()}
    if not detail:
        return loss, {"loss": loss.detach()}
    spreads = {f"spread/{n}": spread(z) for n, z in zip(exit_names(num_exits), out.projections)}
    return loss, {"loss": loss.detach(), **logs, **spreads}


def _dsn(obj: "Objective", out: EncoderOutput, labels, layout: Layout, detail: bool):
    """Deeply-supervised nets: CE(backbone classifier) + w * sum of CE(classifier of each exit)."""
    names = exit_names(len(out.features))
    per_exit = [cross_entropy(logits, labels, obj.label_smoothing) for logits in (*out.sub_logits, out.logits)]
    loss = per_exit[-1] + obj.options["aux_weight"] * sum(per_exit[:-1])
    if not detail:
        return loss, {"loss": loss.detach()}
    logs = {f"loss/ce/{n}": exit_loss.detach() for n, exit_loss in zip(names, per_exit)}
    logs["train_top1"] = (out.logits.detach().argmax(1) == labels).float().mean()
    return loss, {"loss": loss.detach(), **logs,
                  **{f"spread/{n}": spread(logits) for n, logits in zip(names, (*out.sub_logits, out.logits))}}


def _cds(obj: "Objective", out: EncoderOutput, labels, layout: Layout, detail: bool):
    """Contrastive deep supervision: CE(backbone classifier on view 1) + lambda * sum over exits of
    SupCon (SimCLR without labels) between the exit's two views. As the official code, the sum
    includes the backbone's own feature; the paper's equation sums the intermediate stages only."""
    batch = labels.shape[0]
    ce = cross_entropy(out.logits[:batch], labels, obj.label_smoothing)
    names = exit_names(len(out.projections))
    contrast = [supcon_loss(z.unflatten(0, (layout.views, batch)).transpose(0, 1), obj.contrast_labels(labels),
                            temperature=obj.temperature, base_temperature=obj.base_temperature, gather=obj.gather)
                for z in out.projections]
    loss = ce + obj.options["aux_weight"] * sum(contrast)
    if not detail:
        return loss, {"loss": loss.detach()}
    logs = {"loss/ce": ce.detach(), **{f"loss/contrast/{n}": c.detach() for n, c in zip(names, contrast)}}
    logs["train_top1"] = (out.logits.detach()[:batch].argmax(1) == labels).float().mean()
    return loss, {"loss": loss.detach(), **logs, **{f"spread/{n}": spread(z) for n, z in zip(names, out.projections)}}


def _mixco(obj: "Objective", out: EncoderOutput, labels, layout: Layout, detail: bool):
    """MixCo on SimCLR: NT-Xent between the two views, plus mix_weight times the soft InfoNCE of each
    view's mixes against the other view (target: lambda on the first source, 1 - lambda on the
    second), averaged over the two views as the official code does."""
    z = out.projections[-1]
    batch, half = labels.shape[0], labels.shape[0] // 2
    views, mixes = z[:2 * batch].unflatten(0, (2, batch)), z[2 * batch:].unflatten(0, (2, half))
    base = supcon_loss(views.transpose(0, 1), None, temperature=obj.temperature,
                       base_temperature=obj.base_temperature, gather=obj.gather)
    first = torch.arange(half, device=z.device)
    mix = sum(mix_contrast_loss(mixes[v], views[1 - v], layout.mix_lambda[v], first, first + half,
                                temperature=obj.options["mix_temperature"], gather=obj.gather) for v in (0, 1)) / 2
    loss = base + obj.options["mix_weight"] * mix
    if not detail:
        return loss, {"loss": loss.detach()}
    return loss, {"loss": loss.detach(), "loss/ntxent": base.detach(), "loss/mix": mix.detach(),
                  "spread/backbone": spread(z[:2 * batch])}


_SUPCON = dict(loss=_supcon_family, contrastive=True, classifiers="none", evaluation="linear")
# CDS's views differ (official code): view 1, read by the classifier, is crop + flip; view 2 adds colour
_CDS = dict(num_views=2, uses_subnetwork=True, loss=_cds, contrastive=True, classifiers="backbone",
            evaluation="classifier", options={"aux_weight": 0.1}, views=("basic", "contrastive"),
            temperature=0.07, base_temperature=0.07)  # CIFAR/loss.py: SupConLoss(0.07, base 0.07)
# SimCLR and MixCo as MixCo's official simclr/ code: NT-Xent at T = 0.5, no base-temperature rescaling
_NT_XENT = dict(temperature=0.5, base_temperature=None)
METHODS = {m.name: m for m in (
    Method("ce", 1, False, _ce, contrastive=False, classifiers="backbone", evaluation="classifier",
           summary="cross-entropy on the backbone classifier"),
    Method("supcon", 2, False, **_SUPCON, summary="SupCon: 2 augmented views, backbone exit"),
    Method("supcon_s", 1, False, **_SUPCON, summary="SupCon-S: 1 view, backbone exit"),
    Method("selfcon", 1, True, **_SUPCON, options={"alpha": None}, summary="SelfCon: 1 view, every exit"),
    Method("selfcon_m", 2, True, **_SUPCON, options={"alpha": None}, summary="SelfCon-M: 2 views, every exit"),
    Method("dsn", 1, True, _dsn, contrastive=False, classifiers="every_exit", evaluation="classifier",
           options={"aux_weight": 1.0},
           summary="DSN: 1 view, a cross-entropy classifier on every exit"),
    Method("simclr", 2, False, **_SUPCON, **_NT_XENT, labels=False,
           summary="SimCLR: NT-Xent between 2 views, no labels"),
    Method("selfcon_su", 1, True, **_SUPCON, labels=False, options={"alpha": 1.0},
           summary="SelfCon, self-supervised: 1 view, every exit, no backbone-anchor/sub-network pairs"),
    Method("selfcon_mu", 2, True, **_SUPCON, labels=False, options={"alpha": 1.0},
           summary="SelfCon-M, self-supervised: 2 views, every exit, no backbone-anchor/sub-network pairs"),
    Method("mixco", 2, False, _mixco, contrastive=True, classifiers="none", evaluation="linear", labels=False,
           mix=True, **_NT_XENT, options={"mix_temperature": None, "mix_weight": 1.0},
           summary="MixCo on SimCLR: NT-Xent plus a soft InfoNCE of mix-ups of the batch"),
    Method("cds", **_CDS, summary="CDS: 2 views, CE on the backbone + SupCon between the views at every exit"),
    Method("cds_ssl", **_CDS, labels=False,
           summary="CDS, self-supervised terms: CE on the backbone + SimCLR between the views at every exit"),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"method={name!r}: unknown, choose from {', '.join(METHODS)}")
    return METHODS[name]


def build_batch(views: Sequence[torch.Tensor], mix_lambda: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One forward batch from the loader's views: [B] for one view, [V*B] (view-major) for more;
    with ``mix_lambda [V, B/2]``, then per view ``lambda * x[:B/2] + (1 - lambda) * x[B/2:]`` ([V*3B/2]).
    Mixing the normalised images is mixing the images: the normalisation is affine."""
    if mix_lambda is not None:
        half = views[0].shape[0] // 2
        w = mix_lambda.to(views[0].dtype).view(len(views), -1, 1, 1, 1)
        views = (*views, *(torch.lerp(x[half:2 * half], x[:half], w[v]) for v, x in enumerate(views)))
    return views[0] if len(views) == 1 else torch.cat(tuple(views), dim=0)


def stack_exits(projections: Sequence[torch.Tensor], num_views: int) -> torch.Tensor:
    """Per-exit projections ``[V*B, D]`` -> ``[B, V*E, D]``; column ``v*E + e`` is view v, exit e."""
    per_exit = torch.stack([p.unflatten(0, (num_views, -1)) for p in projections], dim=2)  # [V, B, E, D]
    return per_exit.transpose(0, 1).flatten(1, 2)


class Objective:
    """Given (model, views, labels), the loss of a method and what to log per exit. The method
    checks its own settings here, once (the recipe turns a ValueError into its one-line error).
    ``options``: the LOSS_OPTIONS the method reads (others are refused); unset ones take the
    method's defaults. ``gather``: contrast against every process's batch (False: each process's
    own, as some official code)."""

    def __init__(self, method: Method, *, temperature: Optional[float] = None,
                 base_temperature: Optional[float] = None, label_smoothing: float = 0.0, gather: bool = True,
                 **options: Optional[float]):
        self.method, self.label_smoothing, self.gather = method, label_smoothing, gather
        self.temperature = method.temperature if temperature is None else temperature
        if base_temperature is None:  # the method's; None there: the same as temperature (NT-Xent)
            base_temperature = method.base_temperature or self.temperature
        self.base_temperature = base_temperature
        self.options = self._options({k: v for k, v in options.items() if v is not None})

    def _options(self, given: dict) -> dict:
        method = self.method
        for option, value in given.items():
            if option not in LOSS_OPTIONS:
                raise ValueError(f"loss.{option}: unknown, choose from {', '.join(LOSS_OPTIONS)}")
            if option not in method.options:
                users = ", ".join(m.name for m in METHODS.values() if option in m.options)
                raise ValueError(f"loss.{option}={value}: not read by method={method.name} (only by {users})")
            if value < 0 or (value == 0 and LOSS_OPTIONS[option].positive):
                raise ValueError(f"loss.{option}={value} must be {'>' if LOSS_OPTIONS[option].positive else '>='} 0")
        options = {k: v for k, v in method.options.items() if v is not None} | given
        if "mix_temperature" in method.options:  # the official MixCo: the mix-up term at the same T
            options.setdefault("mix_temperature", self.temperature)
        if options.get("alpha") == 0 and not method.labels and method.num_views == 1:
            raise ValueError(f"loss.alpha=0 leaves method={method.name} without a loss (one view, no labels: "
                             f"only the sub-network term has positives)")
        return options

    def __call__(self, model, views: Sequence[torch.Tensor], labels: torch.Tensor, detail: bool = True):
        """The loss and what to log: ``loss``, and with ``detail`` (a step whose logs are read) the
        loss's terms and ``spread/<exit>``, the collapse metric of what the loss reads (projections;
        for cross-entropy, the logits)."""
        if len(views) != self.method.num_views:
            raise ValueError(f"{self.method.name} needs {self.method.num_views} view(s), got {len(views)}")
        layout = Layout(len(views))
        if self.method.mix:
            if views[0].shape[0] % 2:
                raise ValueError(f"{self.method.name} mixes image i with i + B/2: needs an even batch per process, "
                                 f"got {views[0].shape[0]}")
            layout = Layout(len(views), torch.rand(len(views), views[0].shape[0] // 2, device=views[0].device))
        with mark("forward"):
            out = model(build_batch(views, layout.mix_lambda), project=self.method.contrastive)
        with mark("loss"):
            return self.method.loss(self, out, labels, layout, detail)

    def contrast_labels(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """The labels a contrastive term may read: none for a self-supervised method."""
        return labels if self.method.labels else None

    def anchors_with_positive(self, contrast_batch: int, num_classes: int) -> float:
        """The expected share of anchors that have a positive, classes drawn uniformly: 1 where a second
        view or a sub-network gives every anchor one; for one view and the backbone alone (SupCon-S),
        the chance that another image of the ``contrast_batch`` shares its class. An anchor without a
        positive adds nothing to the loss (and at 0 the loss is 0 and nothing learns)."""
        method = self.method
        if not method.contrastive or method.num_views > 1 or method.uses_subnetwork or not method.labels:
            return 1.0
        return 1 - (1 - 1 / num_classes) ** (contrast_batch - 1)

    def loss_at_collapse(self, global_batch: int, num_exits: int) -> Optional[float]:
        """The loss when every feature is the same (None where a cross-entropy term makes it unknown)."""
        views = self.method.num_views
        if self.method.loss is _mixco:  # the soft InfoNCE of a uniform softmax over the batch: log(B)
            return (collapse_value(global_batch * views, self.temperature, self.base_temperature)
                    + self.options["mix_weight"] * math.log(global_batch))
        if self.method.loss is not _supcon_family:
            return None
        value = collapse_value(global_batch * views * num_exits, self.temperature, self.base_temperature)
        alpha = self.options.get("alpha")
        if alpha is None:
            return value
        # backbone anchors have no positive with one view and no labels: that term is 0
        has_positive = self.method.labels or views > 1
        backbone = collapse_value(global_batch * views, self.temperature, self.base_temperature) if has_positive else 0
        return (backbone + alpha * value) / (1 + alpha)


__all__ = ["LOSS_OPTIONS", "METHODS", "Layout", "LossOption", "Method", "Objective", "build_batch", "get_method",
           "stack_exits"]
