"""The signals that a run learns: collapse metric, collapse value and watch, weighted k-NN."""
import math

import pytest
import torch
import torch.nn.functional as F

from fasttrain.engine.knn import knn_votes
from fasttrain.losses import supcon_loss
from fasttrain.methods import Objective, get_method
from fasttrain.monitors import CollapseError, CollapseWatch, collapse_value, spread


def test_spread_is_one_for_spread_features_and_zero_for_identical_ones():
    gen = torch.Generator().manual_seed(0)
    assert spread(torch.randn(4096, 128, generator=gen)).item() == pytest.approx(1.0, abs=0.02)
    same = torch.randn(1, 128, generator=gen).expand(256, 128) + 1e-6 * torch.randn(256, 128, generator=gen)
    assert spread(same).item() < 1e-3
    # a shared offset (what post-ReLU features fed to a plain head give) lowers it: sqrt(1 - |mean|^2)
    offset = F.normalize(torch.randn(4096, 128, generator=gen), dim=1) * 0.5 + F.normalize(torch.ones(1, 128), dim=1)
    assert 0.2 < spread(offset).item() < 0.6


@pytest.mark.parametrize("batch,views,labelled", [(16, 1, True), (16, 2, True), (12, 4, False)])
def test_collapse_value_is_the_loss_of_identical_features(batch, views, labelled):
    z = F.normalize(torch.randn(1, 1, 32), dim=-1).expand(batch, views, 32)
    labels = torch.arange(batch) % 3 if labelled else None
    loss = supcon_loss(z, labels, temperature=0.1, base_temperature=0.07)
    assert loss.item() == pytest.approx(collapse_value(batch * views, 0.1, 0.07), rel=1e-5)
    assert collapse_value(256, 0.1, 0.07) == pytest.approx(math.log(255) / 0.7)


@pytest.mark.parametrize("name,alpha", [("supcon", None), ("supcon_s", None), ("selfcon", None),
                                        ("selfcon_m", None), ("selfcon_m", 0.5), ("selfcon", 2.0)])
def test_objective_knows_its_loss_at_collapse(name, alpha):
    """A model whose every projection is the same vector: the method's loss is its collapse value."""
    method = get_method(name)
    exits = 2 if method.uses_subnetwork else 1
    batch, dim = 10, 8
    constant = F.normalize(torch.ones(dim), dim=0)

    class Collapsed(torch.nn.Module):
        def forward(self, x, project=True):
            from fasttrain.models import EncoderOutput
            z = constant.expand(x.shape[0], dim).clone().requires_grad_()
            return EncoderOutput([z] * exits, [z] * exits, None)

    objective = Objective(method, alpha=alpha)
    views = tuple(torch.zeros(batch, 3, 4, 4) for _ in range(method.num_views))
    loss, logs = objective(Collapsed(), views, torch.arange(batch) % 3)
    assert loss.item() == pytest.approx(objective.loss_at_collapse(batch, exits), rel=1e-5)
    assert all(logs[f"spread/{e}"] < 1e-3 for e in (["sub0", "backbone"] if exits == 2 else ["backbone"]))
    assert Objective(get_method("ce")).loss_at_collapse(batch, 1) is None


@pytest.mark.parametrize("batch,classes", [(8, 4), (32, 100), (64, 10)])
def test_the_share_of_anchors_with_a_positive_is_what_supcon_s_sees(batch, classes):
    from fasttrain.losses import supcon_terms

    gen = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(batch, 1, 8, generator=gen), dim=-1)
    seen = torch.stack([supcon_terms(features, torch.randint(classes, (batch,), generator=gen), gather=False)[1].float()
                        .mean() for _ in range(2000)]).mean().item()
    assert Objective(get_method("supcon_s")).anchors_with_positive(batch, classes) == pytest.approx(seen, abs=0.01)
    for other in ("supcon", "selfcon", "simclr", "ce"):  # a second view or an exit: every anchor has one
        assert Objective(get_method(other)).anchors_with_positive(batch, classes) == 1.0


def test_collapse_watch_warns_once_after_patience_and_resets_on_recovery(caplog):
    watch = CollapseWatch(threshold=0.1, patience=20, loss_at_collapse=7.9161)
    healthy = {"loss": 6.5, "spread/backbone": 0.5, "spread/sub0": 0.4}
    collapsed = {"loss": 7.9160, "spread/backbone": 0.002, "spread/sub0": 0.3}
    assert watch(collapsed, 10) is None and watch(collapsed, 25) is None  # 15 steps < patience
    assert watch(healthy, 30) is None and watch.since is None  # recovered: the count starts again
    assert watch(collapsed, 40) is None
    with caplog.at_level("WARNING", logger="fasttrain"):
        message = watch(collapsed, 60)
    assert "exit backbone spread 0.002" in message and "sub0" not in message
    assert "loss 7.9160 = log(N-1)*T/T_base = 7.9161" in message
    assert len(caplog.records) == 1 and watch(collapsed, 200) is None  # once


def test_collapse_watch_sees_a_pinned_loss_alone_and_stops_when_asked():
    watch = CollapseWatch(threshold=0.1, patience=5, stop=True, loss_at_collapse=7.0)
    row = {"loss": 7.01, "spread/backbone": 0.5}
    watch(row, 1)
    with pytest.raises(CollapseError, match="collapse at step 6 \\(since step 1\\): loss 7.0100"):
        watch(row, 6)
    ce = CollapseWatch(threshold=0.1, patience=5)  # cross-entropy: no collapse value, spread only
    assert ce({"loss": 2.3, "spread/backbone": 0.5}, 100) is None


def test_knn_votes_match_a_loop_over_queries():
    gen = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(50, 6, generator=gen), torch.randint(0, 4, (50,), generator=gen)
    query = torch.randn(7, 6, generator=gen)
    votes = knn_votes(query, bank, labels, num_classes=4, k=5, temperature=0.1, chunk=3)
    bank_n = F.normalize(bank, dim=1)
    for q, row in zip(F.normalize(query, dim=1), votes):
        sim = bank_n @ q
        top = sim.topk(5).indices
        expected = torch.zeros(4)
        for i in top:
            expected[labels[i]] += math.exp(sim[i].item() / 0.1)
        assert torch.allclose(row, expected / expected.sum(), atol=1e-5)
    assert torch.allclose(votes.sum(1), torch.ones(7))


def test_knn_separates_separable_classes():
    centres = F.normalize(torch.randn(3, 16), dim=1) * 5
    gen = torch.Generator().manual_seed(1)
    bank_labels = torch.arange(60) % 3
    bank = centres[bank_labels] + torch.randn(60, 16, generator=gen) * 0.1
    query_labels = torch.arange(30) % 3
    query = centres[query_labels] + torch.randn(30, 16, generator=gen) * 0.1
    assert (knn_votes(query, bank, bank_labels, 3).argmax(1) == query_labels).all()
