"""I(F(x); T(x)) of a trained encoder (SelfCon paper, Section 5.4 and Fig. 6): the mutual information
between the backbone feature F(x) (pooled layer4) and T(x), the pooled output of the stage a
sub-network attaches to, by three variational lower bounds with a learned critic f(x, y) (formulas as
in Poole et al. 2019, "On variational bounds of mutual information"):

* InfoNCE (van den Oord et al. 2018): low variance, but never above log(batch size);
* NWJ (Nguyen, Wainwright & Jordan 2010; TUBA with a = e): E_p[f] - E_q[e^(f-1)], unbounded, high variance;
* MINE (Belghazi et al. 2018): Donsker-Varadhan E_p[f] - log E_q[e^f], trained with the gradient whose
  denominator is a moving average of E_q[e^f] (their bias correction).

Critics are trained on 70% of the encoded pairs, the training step to keep is picked on 10%, and the
bound is reported on the other 20%: a critic that memorised its pairs cannot inflate the estimate.

    python -m fasttrain.analysis.mutual_info runs/r18_selfcon/checkpoint.pt --exit layer2
    python -m fasttrain.analysis.mutual_info --gaussian-check --out /tmp/mi   # the estimators on a known answer

``--gaussian-check`` runs the same estimators on correlated Gaussians, whose MI is known in closed
form, so that a checkpoint's numbers can be read against each estimator's bias at that magnitude. With
the defaults (dim 8, 10,000 pairs) at rho 0.2 / 0.5 / 0.8 / 0.9 the truth is 0.16 / 1.15 / 4.09 / 6.64 nats;
InfoNCE gave 0.12 / 1.09 / 3.43 / 4.47, NWJ 0.12 / 1.07 / 3.73 / 4.90, MINE 0.12 / 1.07 / 3.73 / 5.36.

The estimators are written here, a few lines each, rather than taken from a library: the PyTorch
package that has them with critics, ``torch-mist``, is a one-author research toolkit (last release
0.2.17, April 2024) and not a dependency of this project; ``benchmark-mi`` is JAX, ``latentmi`` is
InfoNCE only. Bending a library's fitting loop to held-out evaluation and step selection would take
more lines than the bounds themselves.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

ESTIMATORS = ("infonce", "nwj", "mine")
CRITICS = ("separable", "concat")
GAUSSIAN_RHOS = (0.2, 0.5, 0.8, 0.9)
MINE_EMA_RATE = 0.01  # the usual MINE choice: E_q[e^f] averaged over ~100 batches


# ---------------------------------------------------------------- bounds on a score matrix

def _joint_and_marginal(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores[i, j] = f(x_i, y_j): the diagonal are samples of p(x, y), the rest of p(x) p(y)."""
    off_diagonal = ~torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    return scores.diagonal(), scores[off_diagonal]


def infonce(scores: torch.Tensor) -> torch.Tensor:
    """mean_i [s_ii - logsumexp_j s_ij] + log N, at most log N."""
    return (scores.diagonal() - scores.logsumexp(dim=1)).mean() + math.log(scores.shape[0])


def _nwj(joint: torch.Tensor, marginal: torch.Tensor) -> torch.Tensor:
    return joint.mean() - (marginal - 1).exp().mean()


def nwj(scores: torch.Tensor) -> torch.Tensor:
    """E_p[f] - e^-1 E_q[e^f]."""
    return _nwj(*_joint_and_marginal(scores))


def _donsker_varadhan(joint: torch.Tensor, marginal: torch.Tensor) -> torch.Tensor:
    return joint.mean() - (marginal.logsumexp(dim=0) - math.log(marginal.numel()))


def donsker_varadhan(scores: torch.Tensor) -> torch.Tensor:
    """E_p[f] - log E_q[e^f], the bound MINE reports."""
    return _donsker_varadhan(*_joint_and_marginal(scores))


class MineObjective:
    """The DV bound to maximise with MINE's gradient: d log E_q[e^f] = d E_q[e^f] / E_q[e^f] is biased on a
    minibatch, so the denominator is a moving average over batches, kept in log space (e^f overflows)."""

    def __init__(self, rate: float = MINE_EMA_RATE):
        self.rate, self.log_average = rate, None

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        joint, marginal = _joint_and_marginal(scores)
        log_mean_exp = marginal.logsumexp(dim=0) - math.log(marginal.numel())
        batch = log_mean_exp.detach()
        self.log_average = batch if self.log_average is None else torch.logaddexp(
            self.log_average + math.log(1 - self.rate), batch + math.log(self.rate))
        # its gradient is d E_q[e^f] / average; its value is not the bound
        return joint.mean() - (log_mean_exp - self.log_average).exp()


# ---------------------------------------------------------------- critics

def _mlp(inputs: int, hidden: int, layers: int, outputs: int) -> nn.Sequential:
    widths = [inputs] + [hidden] * layers
    blocks = [m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(*blocks, nn.Linear(widths[-1], outputs))


class SeparableCritic(nn.Module):
    """f(x, y) = g(x) . h(y): all N x N scores for the cost of 2N network passes."""

    def __init__(self, x_dim: int, y_dim: int, hidden: int = 256, layers: int = 1, embed: int = 32):
        super().__init__()
        self.g, self.h = _mlp(x_dim, hidden, layers, embed), _mlp(y_dim, hidden, layers, embed)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.g(x) @ self.h(y).T


class ConcatCritic(nn.Module):
    """f(x, y) = MLP([x, y]) on every one of the N x N pairs: more expressive, N^2 network passes."""

    def __init__(self, x_dim: int, y_dim: int, hidden: int = 256, layers: int = 1):
        super().__init__()
        self.net = _mlp(x_dim + y_dim, hidden, layers, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return self.net(torch.cat([x[:, None].expand(n, n, -1), y[None].expand(n, n, -1)], dim=2)).squeeze(2)


# ---------------------------------------------------------------- fitting

def estimate(x: torch.Tensor, y: torch.Tensor, estimator: str, critic: str = "separable", steps: int = 2000,
             batch_size: int = 128, seed: int = 0, lr: float = 5e-4, hidden: int = 256, layers: int = 1,
             heldout: float = 0.2, selection: float = 0.1, progress: bool = False) -> dict:
    """The bound in nats on a random ``heldout`` share of the pairs (x_i, y_i), in batches of ``batch_size``
    (InfoNCE's ceiling, log batch_size, depends on it), by a critic trained with Adam on the others. A
    ``selection`` share of all pairs picks the step to keep, as a 256-unit critic overfits a few thousand
    pairs (Gaussians of I = 0.16 nats, 8,000 pairs: held-out InfoNCE 0.12 after 500 steps, 0.03 after 2,000)."""
    from tqdm.auto import tqdm

    if estimator not in ESTIMATORS or critic not in CRITICS:
        raise ValueError(f"estimator {estimator!r} / critic {critic!r}: choose from {ESTIMATORS} / {CRITICS}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    n_test, n_select = max(2, int(len(x) * heldout)), max(2, int(len(x) * selection))
    test, select, train = order[:n_test], order[n_test:n_test + n_select], order[n_test + n_select:]
    if len(train) < batch_size:
        raise ValueError(f"{len(train)} training pairs of {len(x)}: fewer than one batch of {batch_size}")
    # MI is unchanged by an affine map of each variable; unit scale is what the critic's init expects
    x, y = _standardise(x.float(), train), _standardise(y.float(), train)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SeparableCritic(x.shape[1], y.shape[1], hidden, layers) if critic == "separable" \
            else ConcatCritic(x.shape[1], y.shape[1], hidden, layers)
    objective = {"infonce": infonce, "nwj": nwj, "mine": MineObjective()}[estimator]
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    check_every = max(1, steps // 20)
    best_value, best_step, best_state = -math.inf, 0, copy.deepcopy(net.state_dict())
    for step in tqdm(range(1, steps + 1), desc=f"{estimator} critic", leave=False, disable=not progress):
        net.train()
        batch = train[torch.randperm(len(train), generator=generator)[:batch_size]]
        loss = -objective(net(x[batch], y[batch]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % check_every == 0 or step == steps:
            value = _evaluate(net, x[select], y[select], estimator, batch_size)[0]
            if value > best_value:
                best_value, best_step, best_state = value, step, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    value, eval_batch = _evaluate(net, x[test], y[test], estimator, batch_size)
    return {"estimator": estimator, "critic": critic, "estimate": value,
            "bound": math.log(eval_batch) if estimator == "infonce" else None, "steps": steps, "best_step": best_step,
            "batch_size": eval_batch, "train_pairs": len(train), "heldout_pairs": len(test), "seed": seed}


def _standardise(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Unit scale by the ``reference`` rows. A unit (nearly) constant there, a ReLU dead on the training
    pairs, gives the critic nothing to learn and is zeroed: divided by its tiny spread, its values on the
    other rows would reach 1e4-1e5 and the held-out bound -1e3 nats (an untrained ResNet, 48 images)."""
    mean, std = values[reference].mean(0), values[reference].std(0)
    live = std > 1e-3 * std.max().clamp_min(1e-12)
    return torch.where(live, (values - mean) / torch.where(live, std, 1.0), 0.0)


@torch.no_grad()
def _evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, estimator: str, batch_size: int):
    """(bound, batch it was computed in). NWJ and DV pool the samples of every batch (a DV bound is not
    the mean of per-batch ones); InfoNCE is a per-batch bound, averaged."""
    net.eval()
    batch_size = min(batch_size, len(x))
    scores = [net(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x) - batch_size + 1, batch_size)]
    if estimator == "infonce":
        return torch.stack([infonce(s) for s in scores]).mean().item(), batch_size
    joint, marginal = (torch.cat(parts) for parts in zip(*map(_joint_and_marginal, scores)))
    return (_nwj if estimator == "nwj" else _donsker_varadhan)(joint, marginal).item(), batch_size


# ---------------------------------------------------------------- a known answer

def correlated_gaussians(n: int, dim: int, rho: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n pairs of standard normal x, y in R^dim with corr(x_k, y_k) = rho and independent dimensions."""
    x, noise = torch.randn(2, n, dim, generator=torch.Generator().manual_seed(seed))
    return x, rho * x + math.sqrt(1 - rho ** 2) * noise


def gaussian_mi(dim: int, rho: float) -> float:
    """I(x; y) of ``correlated_gaussians`` in nats: -dim/2 log(1 - rho^2)."""
    return -dim / 2 * math.log(1 - rho ** 2)


def gaussian_check(estimators, critic: str = "separable", steps: int = 2000, batch_size: int = 128, dim: int = 8,
                   n: int = 10000, rhos=GAUSSIAN_RHOS, seed: int = 0) -> list[dict]:
    """Per rho: the truth and each estimator's held-out bound on n pairs."""
    from tqdm.auto import tqdm

    rows = [{"rho": rho, "dim": dim, "pairs": n, "truth": gaussian_mi(dim, rho), "batch_size": batch_size}
            for rho in rhos]
    for row, name in tqdm([(r, e) for r in rows for e in estimators], desc="Gaussian check", leave=False):
        x, y = correlated_gaussians(n, dim, row["rho"], seed)
        row[name] = estimate(x, y, name, critic, steps, batch_size, seed)["estimate"]
    return rows


# ---------------------------------------------------------------- a checkpoint

@torch.no_grad()
def encode(model, batches, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(F(x), T(x)) of every image: the backbone feature, and the output of ``stage`` average-pooled as F
    is, caught by a forward hook so that the model stays as it was trained."""
    from tqdm.auto import tqdm

    backbone, intermediate = [], []
    # pooled at once: later layers could reuse the stage's output buffer
    hook = getattr(model, stage).register_forward_hook(
        lambda module, inputs, output: intermediate.append(output.float().mean(dim=(2, 3))))
    try:
        for images, _ in tqdm(batches, desc="encoding", unit="batch", leave=False):
            backbone.append(model(images, project=False).features[-1].float())
    finally:
        hook.remove()
    return torch.cat(backbone), torch.cat(intermediate)


def measure_checkpoint(args) -> tuple[list[dict], dict]:
    from fasttrain.analysis.common import eval_batches, load_trained
    from fasttrain.recipe import RecipeError

    recipe, _, model = load_trained(args.checkpoint, tuple(args.set))
    stage = args.exit or (model.exit_points[0] if model.exit_points else "layer2")
    backbone, intermediate = encode(model, eval_batches(recipe, args.split, args.images), stage)
    info = {"checkpoint": str(args.checkpoint), "method": recipe.method, "exit": stage, "split": args.split,
            "images": len(backbone), "dims": {"F": backbone.shape[1], "T": intermediate.shape[1]}}
    try:
        rows = [estimate(backbone, intermediate, name, args.critic, args.steps, args.batch_size, args.seed,
                         progress=True) | {k: info[k] for k in ("images", "exit", "checkpoint")}
                for name in args.estimators]
    except ValueError as exc:  # too few images for one batch
        raise RecipeError(f"{exc}: use more --images or a smaller --batch-size") from None
    return rows, info


# ---------------------------------------------------------------- reports

def markdown(rows: list[dict], info: Optional[dict], gaussian: list[dict], estimators) -> str:
    lines = []
    if rows:
        lines += [f"# I(F(x); T(x)) of {info['checkpoint']}", "",
                  f"{info['method']}; T: pooled {info['exit']} ({info['dims']['T']} dims), F: backbone "
                  f"({info['dims']['F']} dims); {info['images']} {info['split']} images; nats, on held-out pairs.", "",
                  "| estimator | MI (nats) | log(batch) | critic | steps | kept step | batch | held-out pairs |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['estimator']} | {r['estimate']:.3f} | {_nats(r['bound'])} "
                  f"| {r['critic']} | {r['steps']} | {r['best_step']} | {r['batch_size']} | {r['heldout_pairs']} |"
                  for r in rows] + [""]
    if gaussian:
        g0 = gaussian[0]
        lines += [f"# The estimators on correlated Gaussians: dim {g0['dim']}, {g0['pairs']} pairs, "
                  f"log(batch) = {math.log(g0['batch_size']):.3f}", "",
                  "| rho | truth | " + " | ".join(estimators) + " |", "|---|---|" + "---|" * len(estimators)]
        lines += [f"| {g['rho']} | {g['truth']:.3f} | " + " | ".join(f"{g[e]:.3f}" for e in estimators) + " |"
                  for g in gaussian]
    return "\n".join(lines).rstrip("\n") + "\n"


def _nats(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3f}"


def plot(path: Path, rows: list[dict], info: Optional[dict], gaussian: list[dict], estimators) -> None:
    """A bar per estimator for the checkpoint; each estimator against rho beside the truth on Gaussians."""
    from fasttrain.analysis.common import pyplot, save_png

    plt = pyplot()
    panels = bool(rows) + bool(gaussian)
    axes = list(plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)[1][0])
    fig = axes[0].figure
    if rows:
        ax = axes.pop(0)
        ax.bar_label(ax.bar([r["estimator"] for r in rows], [r["estimate"] for r in rows]), fmt="%.2f", fontsize=8)
        ax.axhline(math.log(rows[0]["batch_size"]), color="grey", linestyle="--", linewidth=0.8,
                   label="log(batch): InfoNCE's ceiling")
        ax.set(ylabel="nats", title=f"I(F; T) at {info['exit']}, {info['method']}, {info['images']} images")
    if gaussian:
        ax, rhos = axes.pop(0), [g["rho"] for g in gaussian]
        dense = [rhos[0] + (rhos[-1] - rhos[0]) * i / 100 for i in range(101)]
        ax.plot(dense, [gaussian_mi(gaussian[0]["dim"], r) for r in dense], "k-", linewidth=2, label="truth")
        for name in estimators:
            ax.plot(rhos, [g[name] for g in gaussian], "o-", label=name)
        ax.axhline(math.log(gaussian[0]["batch_size"]), color="grey", linestyle="--", linewidth=0.8, label="log(batch)")
        ax.set(xlabel="rho per dimension", ylabel="nats", title=f"correlated Gaussians, dim {gaussian[0]['dim']}")
    for ax in fig.axes:
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fasttrain.analysis.mutual_info", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", type=Path, nargs="?",
                   help="checkpoint.pt or its run dir (optional with --gaussian-check)")
    p.add_argument("--split", default="val")
    p.add_argument("--images", type=int, help="at most this many images of the split (default: all)")
    p.add_argument("--estimators", default=",".join(ESTIMATORS), help="comma-separated: " + ", ".join(ESTIMATORS))
    p.add_argument("--critic", default="separable", help="separable: g(x).h(y); concat: an MLP on [x, y]")
    p.add_argument("--steps", type=int, default=2000, help="critic training steps (Adam, lr 5e-4)")
    p.add_argument("--batch-size", type=int, default=128, help="pairs per critic batch; InfoNCE <= log of it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exit", help="the stage T(x) is taken after (default: the model's first exit point, else layer2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, e.g. data.val=DIR")
    p.add_argument("--gaussian-check", action="store_true",
                   help=f"also (or only) the estimators on correlated Gaussians, rho in {GAUSSIAN_RHOS}")
    p.add_argument("--out", type=Path, help="output folder (default: the run dir's analysis/, else ./analysis)")
    return p.parse_args(argv)


def _main(argv=None) -> int:
    from fasttrain.analysis.common import write_json
    from fasttrain.files import write_bytes
    from fasttrain.models.multi_exit import EXIT_POINTS
    from fasttrain.recipe import RecipeError

    args = parse_args(argv)
    args.estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    checks = [("--estimators", e, ESTIMATORS) for e in args.estimators] + [("--critic", args.critic, CRITICS)]
    for flag, value, allowed in checks + ([("--exit", args.exit, EXIT_POINTS)] if args.exit else []):
        if value not in allowed:
            raise RecipeError(f"{flag} {value}: unknown, choose from {', '.join(allowed)}")
    if args.checkpoint is None and not args.gaussian_check:
        raise RecipeError("nothing to do: give a CHECKPOINT, --gaussian-check, or both")
    if not args.estimators or args.steps < 1 or args.batch_size < 2:
        raise RecipeError("--estimators must name one, --steps be positive and --batch-size at least 2")
    run_dir = args.checkpoint if args.checkpoint is None or args.checkpoint.is_dir() else args.checkpoint.parent
    rows, info = measure_checkpoint(args) if args.checkpoint is not None else ([], None)
    gaussian = gaussian_check(args.estimators, args.critic, args.steps, args.batch_size, seed=args.seed) \
        if args.gaussian_check else []
    out = args.out or (run_dir / "analysis" if run_dir else Path("analysis"))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "mutual_info.json", {"checkpoint": info, "results": rows, "gaussian_check": gaussian})
    text = markdown(rows, info, gaussian, args.estimators)
    write_bytes(out / "mutual_info.md", text.encode())
    plot(out / "mutual_info.png", rows, info, gaussian, args.estimators)
    print(f"{text}\nwrote {out / 'mutual_info.json'}, .md and .png")
    return 0


def main(argv=None) -> int:
    """User errors (missing checkpoint, unknown name) are one line and exit code 2."""
    from fasttrain.faults import one_line_errors

    return one_line_errors("fasttrain.analysis.mutual_info", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
