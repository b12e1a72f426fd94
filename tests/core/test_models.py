import pytest
import torch
import torchvision

from fasttrain.models import EncoderOutput, build_encoder


def param_count(params):
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_backbone_is_torchvisions_resnet_without_fc(arch):
    reference = getattr(torchvision.models, arch)()
    expected = param_count(p for n, p in reference.named_parameters() if not n.startswith("fc."))
    model = build_encoder(arch, exits=["layer2"], exit_kind="same")
    assert param_count(model.backbone_parameters()) == expected


def test_backbone_loads_torchvisions_weights_and_computes_its_features():
    reference = torchvision.models.resnet18().eval()
    model = build_encoder("resnet18", exits=[]).eval()
    renamed = {"stem.0.weight": "conv1.weight", **{f"stem.1.{k}": f"bn1.{k}" for k in
                                                   ("weight", "bias", "running_mean", "running_var",
                                                    "num_batches_tracked")}}
    state = {name: reference.state_dict()[renamed.get(name, name)] for name in model.state_dict()
             if not name.startswith("heads.")}
    model.load_state_dict(state, strict=False)
    x = torch.randn(2, 3, 64, 64)
    trunk = torch.nn.Sequential(*list(reference.children())[:-1])
    with torch.no_grad():
        assert torch.allclose(model(x).features[-1], trunk(x).flatten(1), atol=1e-5)


@pytest.mark.parametrize("exit_kind", ["fc", "small", "sepconv"])
def test_width_scales_every_stage_and_exit(exit_kind):
    model = build_encoder("resnet18", stem="cifar", exits=["layer1", "layer2"], exit_kind=exit_kind, width=16)
    out = model(torch.randn(2, 3, 16, 16))
    assert model.stem(torch.randn(1, 3, 16, 16)).shape[1] == 16 and model.feature_dim == 128
    assert [tuple(f.shape) for f in out.features] == [(2, 128)] * 3
    full = build_encoder("resnet18", exits=[])
    half = build_encoder("resnet18", exits=[], width=32)
    ratio = param_count(half.backbone_parameters()) / param_count(full.backbone_parameters())
    assert 0.24 < ratio < 0.26  # convolutions scale with width squared
    with pytest.raises(ValueError, match="width=0"):
        build_encoder("resnet18", width=0)


@pytest.mark.parametrize("kind", ["fc", "small", "same"])
@pytest.mark.parametrize("exit_point", ["layer1", "layer2", "layer3"])
def test_exit_shapes(kind, exit_point):
    model = build_encoder("resnet18", stem="cifar", exits=[exit_point], exit_kind=kind, proj_dim=32, num_classes=7)
    out = model(torch.randn(3, 3, 32, 32))
    assert isinstance(out, EncoderOutput)
    assert [tuple(f.shape) for f in out.features] == [(3, 512), (3, 512)]
    assert [tuple(p.shape) for p in out.projections] == [(3, 32), (3, 32)]
    assert tuple(out.logits.shape) == (3, 7)
    norms = torch.stack([p.norm(dim=1) for p in out.projections])
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_sub_network_sizes_follow_their_kind():
    sizes = {kind: param_count(build_encoder("resnet50", exits=["layer2"], exit_kind=kind).subnetworks.parameters())
             for kind in ("fc", "small", "same")}
    backbone_tail = param_count(build_encoder("resnet50", exits=[]).layer3.parameters()) + \
        param_count(build_encoder("resnet50", exits=[]).layer4.parameters())
    assert sizes["fc"] == 512 * 2048 + 2048  # pool + Linear(512 -> 2048)
    assert sizes["same"] == backbone_tail  # an unshared copy of layer3 + layer4
    assert sizes["fc"] < sizes["small"] < sizes["same"]


def test_exits_come_first_backbone_last_and_several_exits():
    model = build_encoder("resnet18", stem="cifar", exits=["layer3", "layer1"], exit_kind="fc")
    assert model.exit_points == ("layer1", "layer3") and model.num_exits == 3
    out = model(torch.randn(2, 3, 32, 32))
    assert len(out.features) == 3
    # the backbone's feature is the torchvision-style pooled layer4 output
    with torch.no_grad():
        x = model.stem(torch.randn(1, 3, 32, 32))
    assert x.shape[1] == 64


def test_imagenet_stem_downsamples_cifar_stem_does_not():
    imagenet = build_encoder("resnet18", stem="imagenet", exits=[])
    cifar = build_encoder("resnet18", stem="cifar", exits=[])
    x = torch.randn(1, 3, 64, 64)
    assert imagenet.stem(x).shape[-1] == 16 and cifar.stem(x).shape[-1] == 64


def test_shared_trunk_runs_once():
    model = build_encoder("resnet18", stem="cifar", exits=["layer1", "layer2"], exit_kind="fc")
    calls = []
    model.layer1.register_forward_hook(lambda *_: calls.append("layer1"))
    model.layer2.register_forward_hook(lambda *_: calls.append("layer2"))
    model(torch.randn(2, 3, 32, 32))
    assert calls == ["layer1", "layer2"]


def test_channels_last_and_bf16_autocast():
    model = build_encoder("resnet18", stem="cifar", exits=["layer2"]).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.features[-1].dtype == torch.bfloat16
    eager = build_encoder("resnet18", stem="cifar", exits=["layer2"])
    eager.load_state_dict(model.state_dict())
    model.eval(), eager.eval()
    with torch.no_grad():
        a, b = model(x).projections[-1], eager(x.contiguous()).projections[-1]
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="resnet152"), "arch='resnet152'"),
    (dict(arch="resnet18", exits=["layer4"]), "exits='layer4'"),
    (dict(arch="resnet18", exit_kind="huge"), "exit_kind='huge'"),
    (dict(arch="resnet18", proj_dim=0), "proj_dim=0"),
    (dict(arch="resnet18", stem="tiny"), "stem='tiny'"),
    (dict(arch="resnet18", num_classes=0), "num_classes=0"),
])
def test_bad_settings_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_encoder(**kwargs)


@pytest.mark.parametrize("head,layers", [("mlp", 3), ("mlp_bn", 4), ("linear", 1)])
def test_projection_head_kinds(head, layers):
    model = build_encoder("resnet18", stem="cifar", exits=["layer2"], proj_dim=16, head=head)
    assert all(len(h) == layers for h in model.heads)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.heads.modules()) == (head == "mlp_bn")
    out = model(torch.randn(4, 3, 16, 16))
    assert [tuple(p.shape) for p in out.projections] == [(4, 16), (4, 16)]
    with pytest.raises(ValueError, match="model.head='mlp_ln'"):
        build_encoder("resnet18", head="mlp_ln")


@pytest.mark.parametrize("kind", ["small", "same"])
def test_sub_network_convolutions_get_the_backbones_init(kind):
    """kaiming_normal_(fan_out) as torchvision inits the backbone (and the official code both),
    not PyTorch's default kaiming_uniform_(a=sqrt(5)), whose std is ~2.4x smaller here."""
    torch.manual_seed(0)
    model = build_encoder("resnet18", exits=["layer2"], exit_kind=kind, zero_init_residual=True)
    convs = [m for m in model.subnetworks.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
    blocks = [m for m in model.subnetworks.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    assert blocks and all(torch.all(b.bn2.weight == 0) for b in blocks)  # zero_init_residual reaches them too


def test_the_official_cds_imagenet_stem_has_no_max_pool():
    from fasttrain.models import build_encoder
    x = torch.randn(1, 3, 64, 64)
    standard = build_encoder("resnet18", stem="imagenet", exits=(), width=8)
    official = build_encoder("resnet18", stem="imagenet_no_maxpool", exits=(), width=8)
    assert standard.layer1(standard.stem(x)).shape[-1] == 16 and official.layer1(official.stem(x)).shape[-1] == 32
