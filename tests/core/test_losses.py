import math

import pytest
import torch
import torch.nn.functional as F

from fasttrain.losses import cross_entropy, supcon_loss


def reference_loss(features, labels, temperature, base_temperature, anchor_views=None):
    """docs/design.md's formula, one anchor at a time, in float64."""
    batch, views, _ = features.shape
    z = features.double()
    anchor_views = range(views) if anchor_views is None else anchor_views
    label = (lambda b: int(labels[b])) if labels is not None else (lambda b: b)
    everything = [(b, v) for b in range(batch) for v in range(views)]
    losses = []
    for b in range(batch):
        for v in anchor_views:
            others = [k for k in everything if k != (b, v)]
            positives = [k for k in others if label(k[0]) == label(b)]
            if not positives:
                continue
            sims = {k: float(z[b, v] @ z[k]) / temperature for k in others}
            log_norm = math.log(sum(math.exp(s) for s in sims.values()))
            mean_log_prob = sum(sims[p] - log_norm for p in positives) / len(positives)
            losses.append(-(temperature / base_temperature) * mean_log_prob)
    return sum(losses) / len(losses) if losses else 0.0


def reference_loss_torch(features, labels, temperature, base_temperature, anchor_views=None):
    """The same formula with torch ops, differentiable: the gradient reference."""
    batch, views, dim = features.shape
    flat = features.reshape(-1, dim)
    label = torch.arange(batch) if labels is None else labels
    column_label = label.repeat_interleave(views)
    losses = []
    for b in range(batch):
        for v in (range(views) if anchor_views is None else anchor_views):
            sims = flat @ features[b, v] / temperature
            others = torch.ones(batch * views, dtype=torch.bool)
            others[b * views + v] = False
            positives = others & (column_label == label[b])
            if positives.any():
                log_prob = sims - torch.logsumexp(sims[others], dim=0)
                losses.append(-(temperature / base_temperature) * log_prob[positives].mean())
    return torch.stack(losses).mean()


def random_features(batch, views, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, views, dim, generator=gen), dim=-1)


CASES = [
    # (batch, views, labels, anchor_views)
    (6, 2, [0, 0, 1, 1, 2, 2], None),  # SupCon-like: 2 views
    (5, 1, [0, 0, 1, 2, 3], None),  # SupCon-S: singleton classes have no positive
    (4, 3, [0, 1, 0, 1], [0, 1]),  # SelfCon-like: exits, sub-network anchors only
    (7, 4, [3, 3, 3, 1, 2, 2, 0], [1, 3]),  # SelfCon-M-like: 2 views x 2 exits
    (3, 2, None, None),  # labels=None: positives are the same row
]


@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("batch,views,labels,anchor_views", CASES)
def test_matches_per_anchor_reference(batch, views, labels, anchor_views, temperature):
    features = random_features(batch, views, 16)
    labels = None if labels is None else torch.tensor(labels)
    got = supcon_loss(features, labels, temperature=temperature, base_temperature=0.07, anchor_views=anchor_views)
    want = reference_loss(features, labels, temperature, 0.07, anchor_views)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("batch,views,labels,anchor_views", CASES)
def test_gradient_matches_autograd_reference(batch, views, labels, anchor_views):
    """The hand-written backward of the masked logsumexp against autograd through the formula."""
    features = random_features(batch, views, 16, seed=3)
    labels = None if labels is None else torch.tensor(labels)
    ours = features.clone().requires_grad_()
    supcon_loss(ours, labels, temperature=0.2, anchor_views=anchor_views).backward()
    want = features.double().requires_grad_()
    reference_loss_torch(want, labels, 0.2, 0.07, anchor_views).backward()
    torch.testing.assert_close(ours.grad, want.grad.float(), rtol=1e-4, atol=1e-6)


def test_masked_logsumexp_passes_gradcheck():
    from fasttrain.losses import _ContrastLogSumExp

    gen = torch.Generator().manual_seed(0)
    anchors = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    contrast = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    own = torch.tensor([0, 4, 6])
    assert torch.autograd.gradcheck(lambda a, c: _ContrastLogSumExp.apply(a, c, own, 0.3), (anchors, contrast))


def test_no_positive_anywhere_gives_zero_with_gradient():
    features = random_features(4, 1, 8).requires_grad_()
    loss = supcon_loss(features, torch.arange(4))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() == 0


def test_single_feature_is_finite():
    features = random_features(1, 1, 8).requires_grad_()
    loss = supcon_loss(features, torch.tensor([0]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(features.grad).all()


def test_stable_for_tiny_temperature_and_identical_features():
    features = F.normalize(torch.ones(8, 2, 4), dim=-1).requires_grad_()
    loss = supcon_loss(features, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), temperature=0.001)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all()
    # all similarities equal: every anchor's positives get log(1/(N-1)) -> loss = T/Tb * log(N-1)
    assert loss.item() == pytest.approx(0.001 / 0.07 * math.log(15), rel=1e-4)


def test_bfloat16_input_gives_float32_result():
    features = random_features(16, 2, 32, seed=3)
    labels = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(1))
    exact = supcon_loss(features, labels)
    low = supcon_loss(features.bfloat16(), labels)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(exact.item(), rel=2e-2)


def test_bfloat16_under_autocast_is_computed_in_float32():
    features = random_features(8, 2, 16)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = supcon_loss(features, labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(supcon_loss(features, labels).item(), rel=1e-6)


def test_other_view_of_same_image_is_positive_without_labels():
    # Two views identical per row, rows orthogonal: the loss is at its minimum for this geometry.
    rows = torch.eye(4)
    aligned = torch.stack([rows, rows], dim=1)
    shuffled = torch.stack([rows, rows[[1, 2, 3, 0]]], dim=1)
    assert supcon_loss(aligned) < supcon_loss(shuffled)


@pytest.mark.parametrize("bad,match", [
    (dict(features=torch.zeros(4, 8)), r"\[B, V, D\]"),
    (dict(features=torch.zeros(4, 2, 8), labels=torch.zeros(3, dtype=torch.long)), "labels must be"),
    (dict(features=torch.zeros(4, 2, 8), anchor_views=[2]), "anchor_views"),
    (dict(features=torch.zeros(4, 2, 8), temperature=0.0), "temperature"),
])
def test_bad_arguments_name_the_setting(bad, match):
    with pytest.raises(ValueError, match=match):
        supcon_loss(**bad)


def test_cross_entropy_label_smoothing():
    logits = torch.tensor([[4.0, 0.0, 0.0]])
    labels = torch.tensor([0])
    plain, smooth = cross_entropy(logits, labels), cross_entropy(logits, labels, label_smoothing=0.3)
    assert smooth > plain
    log_probs = logits.log_softmax(1)[0]
    expected = -(0.8 * log_probs[0] + 0.1 * log_probs[1] + 0.1 * log_probs[2])
    assert smooth.item() == pytest.approx(expected.item(), rel=1e-6)
