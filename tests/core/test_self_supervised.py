"""Self-supervised methods: SimCLR's NT-Xent, the self-supervised SelfCon of the paper's Appendix C.2,
and MixCo's mix-ups with soft targets."""
import math

import pytest
import torch
import torch.nn.functional as F

from fasttrain.losses import mix_contrast_loss, mix_targets, supcon_loss
from fasttrain.methods import Objective, build_batch, get_method, stack_exits
from fasttrain.models import EncoderOutput

from test_losses import random_features


def nt_xent_loop(z1, z2, temperature):
    """SimCLR's NT-Xent as its paper writes it, one anchor at a time, in float64: anchor k of 2N,
    positive its other view, denominator every other feature."""
    z = torch.cat([z1, z2]).double()
    n = z1.shape[0]
    losses = []
    for k in range(2 * n):
        positive = (k + n) % (2 * n)
        sims = [float(z[k] @ z[j]) / temperature for j in range(2 * n)]
        norm = math.log(sum(math.exp(s) for j, s in enumerate(sims) if j != k))
        losses.append(norm - sims[positive])
    return sum(losses) / len(losses)


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_supcon_without_labels_is_nt_xent_up_to_t_over_t_base(temperature):
    features = random_features(7, 2, 16)
    expected = nt_xent_loop(features[:, 0], features[:, 1], temperature)
    assert supcon_loss(features, None, temperature=temperature, base_temperature=temperature).item() == \
        pytest.approx(expected, rel=1e-5)
    scaled = supcon_loss(features, None, temperature=temperature, base_temperature=0.07).item()
    assert scaled == pytest.approx(expected * temperature / 0.07, rel=1e-5)


def test_simclr_objective_ignores_labels():
    from test_methods import make_views, method_model
    method = get_method("simclr")
    model = method_model("simclr")
    views, labels = make_views(method)
    loss, _ = Objective(method, temperature=0.5, base_temperature=0.5)(model, views, labels)
    same, _ = Objective(method, temperature=0.5, base_temperature=0.5)(model, views, torch.zeros_like(labels))
    z = model(torch.cat(views)).projections[0]
    assert loss.item() == pytest.approx(nt_xent_loop(*z.detach().chunk(2), 0.5), rel=1e-5)
    assert loss.item() == pytest.approx(same.item(), rel=1e-6)


# --- self-supervised SelfCon (Appendix C.2) -------------------------------------------------------------

def selfcon_u_loop(features, alpha, temperature, base_temperature):
    """The C.2 rule, one anchor at a time: ``features [B, V*E, D]``, column v*E + e, backbone last of
    each view. A backbone anchor contrasts backbone features only (its pairs from the sub-network
    removed); a sub-network anchor contrasts every feature. Positives: the same image."""
    batch, columns, _ = features.shape
    exits = 2
    backbone = [c for c in range(columns) if c % exits == exits - 1]
    sub = [c for c in range(columns) if c % exits != exits - 1]

    def term(anchor_columns, contrast_columns):
        losses = []
        for b in range(batch):
            for a in anchor_columns:
                others = [(i, c) for i in range(batch) for c in contrast_columns if (i, c) != (b, a)]
                positives = [k for k in others if k[0] == b]
                if not positives:
                    continue
                sims = {k: float(features[b, a].double() @ features[k].double()) / temperature for k in others}
                norm = math.log(sum(math.exp(s) for s in sims.values()))
                losses.append(-(temperature / base_temperature) * sum(sims[p] - norm for p in positives)
                              / len(positives))
        return sum(losses) / len(losses) if losses else 0.0

    return (term(backbone, backbone) + alpha * term(sub, range(columns))) / (1 + alpha)


@pytest.mark.parametrize("name,views", [("selfcon_su", 1), ("selfcon_mu", 2)])
@pytest.mark.parametrize("alpha", [None, 0.5])
def test_self_supervised_selfcon_follows_the_c2_rule(name, views, alpha):
    batch, dim = 6, 8
    gen = torch.Generator().manual_seed(3)
    sub, backbone = (F.normalize(torch.randn(views * batch, dim, generator=gen), dim=1) for _ in range(2))
    out = EncoderOutput([sub, backbone], [sub, backbone], None)
    objective = Objective(get_method(name), alpha=alpha)
    layout = __import__("fasttrain.methods", fromlist=["Layout"]).Layout(views)
    labels = torch.zeros(batch, dtype=torch.long)  # one class: must not matter, labels never reach the loss
    loss, logs = objective.method.loss(objective, out, labels, layout, True)
    used_alpha = 1.0 if alpha is None else alpha  # the methods' default
    expected = selfcon_u_loop(stack_exits([sub, backbone], views), used_alpha, 0.1, 0.07)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # no backbone-anchor / sub-network-pair term: the backbone anchors' loss does not see the sub-network
    other = F.normalize(torch.randn(views * batch, dim, generator=gen), dim=1)
    _, moved = objective.method.loss(objective, EncoderOutput([other, backbone], [other, backbone], None),
                                     labels, layout, True)
    assert moved["loss/backbone"].item() == pytest.approx(logs["loss/backbone"].item(), rel=1e-6)
    assert moved["loss/subnetworks"].item() != pytest.approx(logs["loss/subnetworks"].item(), rel=1e-3)
    if views == 1:  # one view, no labels: a backbone anchor has no positive, its term is empty
        assert logs["loss/backbone"].item() == 0


def test_self_supervised_selfcon_collapse_value():
    """Every feature the same: the loss equals loss_at_collapse (a backbone term of 0 with one view)."""
    for name, views in (("selfcon_su", 1), ("selfcon_mu", 2)):
        same = F.normalize(torch.ones(views * 4, 8), dim=1)
        objective = Objective(get_method(name), alpha=0.5)
        from fasttrain.methods import Layout
        loss, _ = objective.method.loss(objective, EncoderOutput([same, same], [same, same], None),
                                        torch.arange(4), Layout(views), True)
        assert loss.item() == pytest.approx(objective.loss_at_collapse(4, 2), rel=1e-5)


# --- MixCo --------------------------------------------------------------------------------------------

def test_mix_targets_put_lambda_and_its_complement_on_the_sources():
    lam = torch.tensor([0.0, 0.3, 1.0])
    first, second = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    targets = mix_targets(lam, first, second, 8)
    assert torch.allclose(targets.sum(1), torch.ones(3))
    assert targets[1, 1] == pytest.approx(0.3) and targets[1, 4] == pytest.approx(0.7)
    assert (targets[:, 6:] == 0).all()
    same = mix_targets(torch.tensor([0.25]), torch.tensor([2]), torch.tensor([2]), 4)  # a source mixed with itself
    assert same[0, 2] == pytest.approx(1.0)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_mix_loss_with_lambda_0_or_1_is_hard_infonce(lam):
    gen = torch.Generator().manual_seed(0)
    mixed = F.normalize(torch.randn(3, 8, generator=gen), dim=1)
    contrast = F.normalize(torch.randn(6, 8, generator=gen), dim=1)
    first = torch.arange(3)
    loss = mix_contrast_loss(mixed, contrast, torch.full((3,), lam), first, first + 3, temperature=0.5)
    source = first if lam == 1.0 else first + 3
    assert loss.item() == pytest.approx(F.cross_entropy(mixed @ contrast.T / 0.5, source).item(), rel=1e-6)


def test_mixing_normalised_images_is_normalising_mixed_images():
    gen = torch.Generator().manual_seed(0)
    raw = [torch.rand(6, 3, 4, 4, generator=gen) for _ in range(2)]
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    lam = torch.tensor([[0.0, 0.4, 1.0], [0.7, 0.2, 0.5]])  # one lambda per pair and view
    batch = build_batch([(x - mean) / std for x in raw], lam)
    assert batch.shape == (2 * 6 + 2 * 3, 3, 4, 4)
    for v, x in enumerate(raw):
        assert torch.equal(batch[6 * v:6 * (v + 1)], (x - mean) / std)  # the views first, unchanged
        w = lam[v].view(-1, 1, 1, 1)
        mixed = w * x[:3] + (1 - w) * x[3:]
        assert torch.allclose(batch[12 + 3 * v:12 + 3 * (v + 1)], (mixed - mean) / std, atol=1e-6)


def test_mixco_objective_is_ntxent_plus_weighted_mix_term():
    from test_methods import make_views, method_model
    method = get_method("mixco")
    model = method_model("mixco")
    views, labels = make_views(method)
    torch.manual_seed(5)
    loss, logs = Objective(method, temperature=0.5, base_temperature=0.5, mix_weight=0.3)(model, views, labels)
    torch.manual_seed(5)
    lam = torch.rand(2, 4)
    z = model(build_batch(views, lam)).projections[0]
    z1, z2, m1, m2 = z[:8], z[8:16], z[16:20], z[20:24]
    first = torch.arange(4)
    mix = (mix_contrast_loss(m1, z2, lam[0], first, first + 4)
           + mix_contrast_loss(m2, z1, lam[1], first, first + 4)) / 2
    assert logs["loss/ntxent"].item() == pytest.approx(nt_xent_loop(z1.detach(), z2.detach(), 0.5), rel=1e-5)
    assert logs["loss/mix"].item() == pytest.approx(mix.item(), rel=1e-5)
    assert loss.item() == pytest.approx(logs["loss/ntxent"].item() + 0.3 * mix.item(), rel=1e-5)


def test_mixco_settings_are_checked():
    with pytest.raises(ValueError, match="needs an even batch"):
        from test_methods import method_model
        Objective(get_method("mixco"))(method_model("mixco"), [torch.randn(3, 3, 8, 8)] * 2, torch.zeros(3).long())
    with pytest.raises(ValueError, match="loss.mix_weight=0.5: not read by method=simclr"):
        Objective(get_method("simclr"), mix_weight=0.5)
    assert Objective(get_method("mixco"), temperature=0.2).options["mix_temperature"] == 0.2  # official: the same T
    with pytest.raises(ValueError, match="loss.alpha=0 leaves method=selfcon_su without a loss"):
        Objective(get_method("selfcon_su"), alpha=0.0)
    assert Objective(get_method("selfcon_mu"), alpha=0.0).options["alpha"] == 0  # two views: SimCLR on the backbone
