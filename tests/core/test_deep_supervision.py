"""DSN and CDS (Contrastive Deep Supervision): their losses are the sums they declare, each term
reads what it should, and the sepconv exits are CDS's auxiliary stacks."""
import re

import pytest
import torch
import torch.nn.functional as F

from fasttrain.losses import supcon_loss
from fasttrain.methods import Objective, get_method
from fasttrain.models import build_encoder
from fasttrain.recipe import RecipeError, load_recipe
from test_methods import make_views, method_model

STAGE_EXITS = {"exits": ["layer1", "layer2", "layer3"], "exit_kind": "sepconv", "head": "none"}


def forward(name, aux_weight=None, **model):
    method = get_method(name)
    encoder = method_model(name, **{**STAGE_EXITS, **model})
    views, labels = make_views(method, batch=8)
    loss, logs = Objective(method, temperature=0.07, base_temperature=0.07, aux_weight=aux_weight)(
        encoder, views, labels)
    return encoder, views, labels, loss, logs


@pytest.mark.parametrize("name", ["cds", "dsn"])
def test_a_zero_weight_leaves_plain_cross_entropy_on_the_backbone(name):
    encoder, views, labels, loss, _ = forward(name, aux_weight=0.0)
    logits = encoder(torch.cat(views), project=False).logits[:8]  # cds: CE reads view 1 of the [2B] forward
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


@pytest.mark.parametrize("name,labelled", [("cds", True), ("cds_ssl", False)])
def test_each_stage_term_is_supcon_over_that_stages_two_views(name, labelled):
    encoder, views, labels, loss, logs = forward(name)
    out = encoder(torch.cat(views))
    assert len(out.projections) == 4  # layer1, layer2, layer3 and the backbone (as the official code)
    terms = []
    for exit_name, z in zip(["sub0", "sub1", "sub2", "backbone"], out.projections):
        two_views = torch.stack([z[:8], z[8:]], dim=1)  # [B, 2, D]
        expected = supcon_loss(two_views, labels if labelled else None, temperature=0.07, base_temperature=0.07)
        assert logs[f"loss/contrast/{exit_name}"].item() == pytest.approx(expected.item(), rel=1e-5)
        terms.append(expected)
    ce = F.cross_entropy(out.logits[:8], labels)
    assert loss.item() == pytest.approx((ce + 0.1 * sum(terms)).item(), rel=1e-5)  # lambda = 0.1 by default


def test_dsn_is_backbone_ce_plus_weighted_ce_of_every_exit():
    encoder, views, labels, loss, logs = forward("dsn", aux_weight=0.5)
    out = encoder(views[0], project=False)
    assert len(out.sub_logits) == 3
    exits = [F.cross_entropy(logits, labels) for logits in out.sub_logits]
    expected = F.cross_entropy(out.logits, labels) + 0.5 * sum(exits)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["loss/ce/sub2"].item() == pytest.approx(exits[2].item(), rel=1e-5)


def test_a_stages_contrast_reaches_that_stage_and_not_later_ones():
    encoder, views, labels, _, _ = forward("cds")
    out = encoder(torch.cat(views))
    z = out.projections[0]  # the layer1 exit
    supcon_loss(torch.stack([z[:8], z[8:]], dim=1), labels).backward()

    def touched(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert touched(encoder.stem) and touched(encoder.layer1) and touched(encoder.subnetworks["layer1"])
    for later in (encoder.layer2, encoder.layer3, encoder.layer4, encoder.subnetworks["layer2"],
                  encoder.subnetworks["layer3"], encoder.classifier):
        assert not touched(later)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_sepconv_exits_double_channels_stage_by_stage_up_to_the_backbone_width(arch):
    model = build_encoder(arch, exits=["layer1", "layer2", "layer3"], exit_kind="sepconv")
    width = model.feature_dim
    for point, blocks in (("layer1", 3), ("layer2", 2), ("layer3", 1)):
        convs = [m for m in model.subnetworks[point].modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == 4 * blocks  # depthwise, pointwise, depthwise, pointwise per block
        depthwise = [c for c in convs if c.groups > 1]
        assert all(c.groups == c.in_channels == c.out_channels and c.kernel_size == (3, 3) for c in depthwise)
        assert [c.stride for c in depthwise][::2] == [(2, 2)] * blocks
        assert convs[-1].out_channels == width and convs[0].in_channels == width // 2 ** blocks
    features = model(torch.randn(2, 3, 64, 64), project=False).features
    assert [f.shape for f in features] == [(2, width)] * 4


@pytest.mark.parametrize("override,names", [
    ("loss.alpha=0.5", "loss.alpha=0.5: not read by method=cds (only by selfcon, selfcon_m, selfcon_su, selfcon_mu)"),
    ("method=selfcon loss.aux_weight=0.1", "loss.aux_weight=0.1: not read by method=selfcon"),
    ("schedule.milestones=[]", "schedule.kind=step needs schedule.milestones"),
    ("schedule.kind=cosine", "schedule.milestones=[90, 180, 280]: read only with schedule.kind=step"),
    ("schedule.milestones=[30,400]", "schedule.milestones=[30, 400]"),
    ("model.exits=[]", "model.exits is empty but method=cds needs a sub-network exit"),
    ("train.grad_accum_steps=2", "a contrastive loss needs every feature"),
])
def test_impossible_settings_are_one_line_naming_the_key(override, names):
    with pytest.raises(RecipeError, match=re.escape(names)):
        load_recipe("recipes/cifar100_r18_cds.yaml", override.split())
