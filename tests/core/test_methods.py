import pytest
import torch

from fasttrain.losses import supcon_loss
from fasttrain.methods import METHODS, Objective, build_batch, get_method, stack_exits
from fasttrain.models import build_encoder


def tiny_model(exits=("layer2",), num_classes=None):
    torch.manual_seed(0)
    return build_encoder("resnet18", stem="cifar", exits=exits, exit_kind="fc", proj_dim=16, num_classes=num_classes)


def make_views(method, batch=8, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    views = tuple(torch.randn(batch, 3, size, size, generator=gen) for _ in range(method.num_views))
    return views, torch.arange(batch) % 3


def test_batch_builder_single_and_two_view():
    a, b = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    assert build_batch((a,)) is a
    assert torch.equal(build_batch((a, b)), torch.cat([a, b]))


def test_stack_exits_layout_is_view_major_then_exit():
    batch, dim = 3, 5
    sub, backbone = torch.randn(2 * batch, dim), torch.randn(2 * batch, dim)
    stacked = stack_exits([sub, backbone], num_views=2)
    assert stacked.shape == (batch, 4, dim)
    assert torch.equal(stacked[:, 0], sub[:batch]) and torch.equal(stacked[:, 1], backbone[:batch])
    assert torch.equal(stacked[:, 2], sub[batch:]) and torch.equal(stacked[:, 3], backbone[batch:])


def method_model(name, **model):
    """The encoder the trainer builds for method ``name`` (ResNet-18, cifar stem, small heads)."""
    from fasttrain.engine.trainer import build_model
    from fasttrain.recipe import Recipe
    torch.manual_seed(0)
    recipe = Recipe(method=name, model={"arch": "resnet18", "stem": "cifar", "proj_dim": 16, **model})
    return build_model(recipe, get_method(name), num_classes=3)


@pytest.mark.parametrize("name,rows", [("ce", 8), ("supcon", 16), ("supcon_s", 8), ("selfcon", 8), ("selfcon_m", 16),
                                       ("dsn", 8), ("cds", 16), ("cds_ssl", 16), ("simclr", 16), ("selfcon_su", 8),
                                       ("selfcon_mu", 16), ("mixco", 24)])
def test_one_forward_of_the_right_size_per_method(name, rows):
    method = get_method(name)
    model = method_model(name)
    seen = []
    model.stem.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    views, labels = make_views(method)
    loss, logs = Objective(method)(model, views, labels)
    assert seen == [rows]
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in logs.values())


def test_selfcon_loss_is_supcon_loss_over_exits():
    method = get_method("selfcon")
    model = tiny_model()
    views, labels = make_views(method)
    loss, logs = Objective(method)(model, views, labels)
    out = model(views[0])
    expected = supcon_loss(torch.stack(out.projections, dim=1), labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(logs) == {"loss", "loss/sub0", "loss/backbone", "spread/sub0", "spread/backbone"}


def test_supcon_contrasts_two_views_of_the_backbone():
    method = get_method("supcon")
    model = tiny_model(exits=())
    views, labels = make_views(method)
    loss, _ = Objective(method)(model, views, labels)
    z = model(torch.cat(views)).projections[0]
    expected = supcon_loss(torch.stack(z.chunk(2), dim=1), labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_alpha_interpolation_follows_eq7(alpha):
    method = get_method("selfcon_m")
    model = tiny_model()
    views, labels = make_views(method)
    loss, _ = Objective(method, alpha=alpha)(model, views, labels)
    features = stack_exits(model(torch.cat(views)).projections, 2)  # columns: v0 sub, v0 bb, v1 sub, v1 bb
    sup = supcon_loss(features[:, [1, 3]], labels)
    sub = supcon_loss(features, labels, anchor_views=[0, 2])
    assert loss.item() == pytest.approx(((sup + alpha * sub) / (1 + alpha)).item(), rel=1e-5)


def test_alpha_needs_a_subnetwork():
    with pytest.raises(ValueError, match="loss.alpha=0.5"):
        Objective(get_method("supcon"), alpha=0.5)


def test_unknown_method_and_wrong_view_count():
    with pytest.raises(ValueError, match="method='byol'"):
        get_method("byol")
    with pytest.raises(ValueError, match="needs 2 view"):
        Objective(get_method("supcon"))(tiny_model(exits=()), (torch.randn(2, 3, 8, 8),), torch.zeros(2).long())


def test_subnetwork_loss_reaches_trunk_but_not_later_backbone_stages():
    model = tiny_model()
    out = model(torch.randn(8, 3, 16, 16))
    supcon_loss(out.projections[0][:, None], torch.arange(8) % 2).backward()

    def touched(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert touched(model.stem) and touched(model.layer1) and touched(model.layer2)
    assert touched(model.subnetworks) and touched(model.heads[0])
    assert not touched(model.layer3) and not touched(model.layer4) and not touched(model.heads[1])


def test_methods_without_subnetwork_build_none():
    from fasttrain.engine.trainer import build_model
    from fasttrain.recipe import Recipe
    for name, method in METHODS.items():
        model = build_model(Recipe(method=name), method, num_classes=10)
        assert (len(model.subnetworks) > 0) == method.uses_subnetwork, name
        assert (model.classifier is not None) == (name in ("ce", "dsn", "cds", "cds_ssl")), name
        assert (model.exit_classifiers is not None) == (name == "dsn"), name


def _train_steps(model_fn, steps=8):
    method = get_method("selfcon")
    model = model_fn()
    objective = Objective(method)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    views, labels = make_views(method, batch=16, seed=1)
    losses = []
    for _ in range(steps):
        loss, _ = objective(model, views, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_selfcon_steps_lower_the_loss_on_a_fixed_batch():
    losses = _train_steps(tiny_model)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.slow(minutes=1.5)
def test_selfcon_steps_lower_the_loss_under_torch_compile():
    losses = _train_steps(lambda: torch.compile(tiny_model()), steps=6)
    assert losses[-1] < 0.8 * losses[0]
