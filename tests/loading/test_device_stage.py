"""The device stage: torchvision's colour augmentation batched on the device, image by image the same
as torchvision's functional ops for the same parameters, with torchvision's parameter distributions."""
import itertools

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from loaders.device_stage import ColourParams, DeviceColour

ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def reference(image, factors, order, jitter, grey, blur, sigma, kernel):
    """One image through torchvision's functional ops, in the drawn order."""
    if jitter:
        for kind in order:
            image = ADJUST[kind](image, float(factors[kind]))
    if grey:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if blur:
        image = TF.gaussian_blur(image, [kernel, kernel], [float(sigma), float(sigma)])
    return image


@pytest.mark.parametrize("augment", ["contrastive", "simclr"])
def test_each_image_equals_torchvision_for_its_parameters(augment):
    stage = DeviceColour(augment, 40, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(24, 3, 40, 40, generator=gen)
    params = stage.draw(24, images.device, gen)
    params = params._replace(jitter=torch.arange(24) % 4 != 0, grey=torch.arange(24) % 5 == 0,
                             blur=(torch.arange(24) % 2 == 0) & (stage.kernel > 1))  # every combination
    ours = stage.apply(images.clone(), params)
    for i in range(24):
        want = reference(images[i], params.factors[i], params.order[i].tolist(), params.jitter[i], params.grey[i],
                         params.blur[i], params.sigma[i], stage.kernel)
        assert torch.allclose(ours[i], want, atol=2e-5), (i, (ours[i] - want).abs().max())


def test_the_parameters_follow_torchvisions_distributions():
    stage = DeviceColour("simclr", 64, (0, 0, 0), (1, 1, 1))
    p: ColourParams = stage.draw(60_000, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert abs(p.jitter.float().mean() - 0.8) < 0.01 and abs(p.grey.float().mean() - 0.2) < 0.01
    assert abs(p.blur.float().mean() - 0.5) < 0.01
    low, high = torch.tensor([0.2, 0.2, 0.2, -0.2]), torch.tensor([1.8, 1.8, 1.8, 0.2])  # SimCLR: 0.8, 0.8, 0.8, 0.2
    assert (p.factors >= low).all() and (p.factors <= high).all()
    assert torch.allclose(p.factors.mean(0), (low + high) / 2, atol=0.01)
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0 and abs(p.sigma.mean() - 1.05) < 0.01
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in p.order.tolist():
        counts[tuple(row)] += 1
    assert min(counts.values()) > 60_000 / 24 * 0.9 and max(counts.values()) < 60_000 / 24 * 1.1  # all 24, uniform


def test_uint8_in_normalised_float_out_and_no_colour_for_plain_crops():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    plain = DeviceColour("basic", 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(images)
    assert plain.dtype == torch.float32 and torch.allclose(plain, images.float() / 255 * 2 - 1)
    stage = DeviceColour("contrastive", 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    coloured = stage(images, torch.Generator().manual_seed(0))
    assert coloured.shape == images.shape and not torch.allclose(coloured, plain)


@pytest.mark.parametrize("augment", ["contrastive", "simclr"])
def test_the_torchvision_loader_can_hand_uint8_crops_to_the_device_stage(tmp_path, augment):
    """data.colour_stage: device: the workers only crop and flip; the batch arrives normalised, in the
    contract's dtype and layout, and coloured per image (two views of one image differ in colour)."""
    from conftest import colour_folder
    from loaders import DataConfig, LoaderRequest, build_loader
    from loaders.torchvision_loader import TorchvisionLoader
    root = colour_folder(tmp_path / "c", [6, 6])
    cfg = DataConfig(train=root, image_size=16, num_workers=0, colour_stage="device", crop_scale=(1.0, 1.0),
                     crop_ratio=(1.0, 1.0))
    req = LoaderRequest(split="train", batch_size=12, augment=augment, num_views=2, channels_last=True)
    loader = build_loader("torchvision", cfg, req)
    assert isinstance(loader, TorchvisionLoader) and loader.stages is not None
    torch.manual_seed(0)
    (a, b), labels = next(iter(loader))
    assert a.dtype == torch.float32 and a.shape == (12, 3, 16, 16)
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert labels.shape == (12,)
    means_a, means_b = a.mean(dim=(2, 3)), b.mean(dim=(2, 3))  # constant images: colour is all that differs
    assert (means_a - means_b).abs().max() > 0.1
    host = build_loader("torchvision", cfg.model_copy(update={"colour_stage": "host"}), req)
    assert host.stages is None  # and on a CPU, auto keeps the colour in the workers
    assert build_loader("torchvision", cfg.model_copy(update={"colour_stage": "auto"}), req).stages is None
