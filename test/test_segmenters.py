"""The segmenter zoo: every architecture builds, runs one pass, exposes taps and bundles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segmentation_safety.checkpoint import BundleError, load_bundle, save_bundle
from segmentation_safety.models import segmenter as segmenter_module
from segmentation_safety.models.espnetv2 import ESPNetv2Segmenter
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.models.tiny import TinySegmenter
from segmentation_safety.models.zoo import (
    available_segmenters,
    build_segmenter,
    segmenter_from_bundle,
    segmenter_metadata,
)

torch.set_num_threads(1)

# Small but valid options per architecture; num_classes differs from 19 on purpose.
ARCHS = {
    "tiny": {"num_classes": 5, "width": 8},
    "lraspp_mobilenet_v3": {"num_classes": 5},
    "deeplabv3_resnet50": {"num_classes": 5},
    "espnetv2": {"num_classes": 5, "scale": 0.5},
}


def _images(b: int = 2, h: int = 48, w: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def _randomise_norm_stats(model: torch.nn.Module, seed: int) -> None:
    # Fresh BatchNorm stats are 0/1 in every build; make them differ so round trips count.
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_registry_lists_every_architecture():
    assert set(ARCHS) <= set(available_segmenters())
    assert available_segmenters() == sorted(available_segmenters())


def test_unknown_name_is_refused_with_the_known_ones():
    with pytest.raises(KeyError) as info:
        build_segmenter("segformer_b9")
    message = str(info.value)
    assert "segformer_b9" in message
    for name in ARCHS:
        assert name in message


@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided"])
def test_uint8_frames_normalise_exactly_as_their_float_values(layout, monkeypatch):
    # The node hands uint8 pixels straight to a table lookup (no float copy first): the
    # network must see the very same input, for every byte value, in every layout.
    seg = TinySegmenter(mean=(0.3, 0.5, 0.7), std=(0.2, 0.25, 0.3))
    pixels = torch.randint(0, 256, (2, 24, 40, 3), dtype=torch.uint8)
    pixels[0, :8].view(-1, 3)[:256] = torch.arange(256, dtype=torch.uint8).view(256, 1)
    frame = pixels.permute(0, 3, 1, 2)  # channels-last, as a message's pixels arrive
    if layout == "contiguous":
        frame = frame.contiguous()
    elif layout == "strided":
        frame = frame[:, :, :, ::2]  # no lookup path: the multiply-add
    want = seg.normalize(frame.float())
    lookups = []
    real_lut = segmenter_module.cv2.LUT
    monkeypatch.setattr(
        segmenter_module.cv2, "LUT", lambda *a, **k: lookups.append(1) or real_lut(*a, **k)
    )
    got = seg.normalize(frame)
    assert got.dtype == torch.float32 and got.shape == want.shape and torch.equal(got, want)
    assert bool(lookups) == (layout != "strided")
    assert seg.normalize(frame[:, :, :0]).shape == (2, 3, 0, frame.shape[-1])
    # A segmenter cast to double keeps its precision: the float32 table is not for it.
    double = seg.double().normalize(frame)
    assert double.dtype == torch.float64 and torch.equal(double, seg.normalize(frame.float()))


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_one_forward_pass_gives_logits_features_and_taps(name):
    torch.manual_seed(0)
    model = build_segmenter(name, **ARCHS[name]).eval()
    assert isinstance(model, Segmenter)
    assert model.num_classes == ARCHS[name]["num_classes"]
    images = _images()
    taps = sorted(model.embedding_channels)
    with torch.no_grad():
        out = model(model.normalize(images), embeddings=taps)
    b, k, h, w = out.logits.shape
    assert (b, k) == (2, model.num_classes)
    assert 1 <= h <= images.shape[2] and 1 <= w <= images.shape[3]
    assert out.features.shape == (2, model.feature_channels, h, w)
    assert set(out.embeddings) == set(taps)
    for tap, channels in model.embedding_channels.items():
        emb = out.embeddings[tap]
        assert emb.shape[:2] == (2, channels), tap
        assert torch.isfinite(emb).all(), tap
    assert torch.isfinite(out.logits).all()
    # Samples are processed independently in eval mode.
    with torch.no_grad():
        single = model(model.normalize(images[1:]))
    torch.testing.assert_close(single.logits[0], out.logits[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_taps_are_read_before_the_activation(name):
    model = build_segmenter(name, **ARCHS[name]).eval()
    _randomise_norm_stats(model, 1)
    encoder_taps = [t for t in model.embedding_channels if t not in ("background",)]
    with torch.no_grad():
        out = model(model.normalize(_images(1)), embeddings=encoder_taps)
    for tap in encoder_taps:
        # A map taken after ReLU could not hold negative values.
        assert (out.embeddings[tap] < 0).any(), tap


def test_only_requested_taps_come_back_and_unknown_ones_are_refused():
    model = build_segmenter("espnetv2", scale=0.5).eval()
    with torch.no_grad():
        out = model(model.normalize(_images(1)), embeddings=["level3"])
        assert set(out.embeddings) == {"level3"}
        with pytest.raises(KeyError, match="available"):
            model(model.normalize(_images(1)), embeddings=["nope"])


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3", "deeplabv3_resnet50"])
def test_torchvision_wrappers_match_torchvision_forward(name):
    torch.manual_seed(1)
    model = build_segmenter(name, **ARCHS[name]).eval()
    _randomise_norm_stats(model, 2)
    x = model.normalize(_images(1, 64, 80))
    with torch.no_grad():
        ours = model(x).logits
        reference = model.net(x)["out"]
    ours = F.interpolate(ours, size=x.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_espnetv2_keeps_the_extra_channel_as_background_tap_and_takes_odd_sizes():
    torch.manual_seed(0)
    model = build_segmenter("espnetv2", scale=1.0, num_classes=19).eval()
    assert model.embedding_channels["background"] == 1
    x = model.normalize(_images(1, 75, 101))
    with torch.no_grad():
        out = model(x, embeddings=["background", "level4"])
        full = model.net(x)["logits"]
    # Stride 2 output, rounded up like the strided convs.
    assert out.logits.shape == (1, 19, 38, 51)
    torch.testing.assert_close(full[:, :19], out.logits)
    torch.testing.assert_close(full[:, 19:], out.embeddings["background"])
    assert out.embeddings["level4"].shape == (1, 256, 5, 7)


@pytest.mark.parametrize(
    ("name", "tap"),
    [("espnetv2", "level3"), ("lraspp_mobilenet_v3", "low"), ("deeplabv3_resnet50", "layer2")],
)
def test_weights_are_channels_last_and_give_the_plain_layout_result(name, tap, tmp_path):
    # Frames reach the network channels-first: weights kept channels-last take the pass
    # into that layout (faster on the CPU), and the logits come out in it for the label
    # map's row gathers. A bundle loads into it too.
    import copy

    torch.manual_seed(1)
    options = {"num_classes": 19, "scale": 0.5} if name == "espnetv2" else ARCHS[name]
    model = build_segmenter(name, **options).eval()
    _randomise_norm_stats(model, 2)
    path = tmp_path / "segmenter.safetensors"
    save_bundle(path, model.state_dict(), segmenter_metadata(model))
    loaded = segmenter_from_bundle(load_bundle(path, kind="segmenter"), str(path))
    for m in (model, loaded):
        # Grouped and 1×1 kernels are laid out alike either way: the others tell.
        weights = [c.weight for c in m.modules() if isinstance(c, torch.nn.Conv2d)
                   and c.groups == 1 and c.kernel_size != (1, 1)]  # fmt: skip
        assert weights
        for w in weights:
            assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    x = model.normalize(_images(1, 64, 96))
    assert x.is_contiguous()
    with torch.no_grad():
        a, b = model(x, embeddings=[tap]), plain(x, embeddings=[tap])
    assert a.logits.stride(1) == 1  # each pixel's classes side by side
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.embeddings[tap], b.embeddings[tap], atol=1e-4, rtol=1e-4)


def test_espnetv2_channel_shuffle_keeps_channels_last_maps_so_with_the_same_values():
    from segmentation_safety.models.espnetv2 import _ChannelShuffle

    torch.manual_seed(0)
    x = torch.randn(2, 12, 5, 7)
    shuffle = _ChannelShuffle(3)
    # Output channel j·3 + i is input channel i·4 + j: channel 1 is the second group's first.
    expected = torch.stack([x[:, i * 4 + j] for j in range(4) for i in range(3)], dim=1)
    assert torch.equal(expected[:, 1], x[:, 4])
    last = shuffle(x.contiguous(memory_format=torch.channels_last))
    assert last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous()
    assert torch.equal(last, expected)
    assert torch.equal(shuffle(x), expected) and shuffle(x).is_contiguous()


def test_espnetv2_pools_each_level_of_the_image_once_a_pass(monkeypatch):
    from segmentation_safety.models import espnetv2

    img = torch.randn(1, 3, 64, 96)
    pyramid = espnetv2.ImagePyramid(img)
    for height in (32, 16, 8, 5, 16):  # the downsamplers' order, an odd size, a level again
        reference = img
        while reference.shape[-2] > height:
            reference = F.avg_pool2d(reference, 3, 2, 1)
        assert torch.equal(pyramid.down_to(height), reference)
    model = build_segmenter("espnetv2", scale=0.5, num_classes=19).eval()
    x = model.normalize(_images(1, 64, 96))
    pooled = []
    pool = F.avg_pool2d

    def spy(t, *args, **kwargs):
        if t.shape[1] == 3:  # the image: the feature maps have more channels
            pooled.append(tuple(t.shape[-2:]))
        return pool(t, *args, **kwargs)

    monkeypatch.setattr(espnetv2.F, "avg_pool2d", spy)
    with torch.no_grad():
        model(x)
    # Levels 2-4 read it at strides 4, 8 and 16: four pools in all (one per downsampler
    # and level, nine, before).
    assert pooled == [(64, 96), (32, 48), (16, 24), (8, 12)]


def test_espnetv2_rejects_unknown_scale():
    with pytest.raises(ValueError, match="scale"):
        ESPNetv2Segmenter(scale=3.0)


@pytest.mark.parametrize("name", ["tiny", "lraspp_mobilenet_v3", "espnetv2"])
def test_bundle_round_trip_rebuilds_the_same_network(name, tmp_path):
    torch.manual_seed(3)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    model = build_segmenter(name, mean=mean, std=std, **ARCHS[name]).eval()
    _randomise_norm_stats(model, 4)
    path = tmp_path / f"{name}.safetensors"
    save_bundle(path, model.state_dict(), segmenter_metadata(model))

    bundle = load_bundle(path, kind="segmenter")
    # The given options, and the constructor's defaults for the others (so a bundle does
    # not depend on those defaults staying the same).
    arch = bundle.metadata["architecture"]
    assert arch["name"] == name and ARCHS[name].items() <= arch.items()
    # The normalisation is recorded as given, each under its own name.
    assert bundle.metadata["mean"] == pytest.approx(mean)
    assert bundle.metadata["std"] == pytest.approx(std)
    if name == "tiny":
        assert arch["dropout"] == 0.1  # a default, not given in ARCHS
    if name == "espnetv2":
        assert arch["extra_channels"] == 1 and arch["dropout"] == 0.0
    torch.manual_seed(99)  # a different random init that loading must overwrite
    rebuilt = segmenter_from_bundle(bundle, str(path))
    assert type(rebuilt) is type(model) and not rebuilt.training
    torch.testing.assert_close(rebuilt.mean.flatten(), torch.tensor(mean))
    images = _images(1)
    with torch.no_grad():
        a = model(model.normalize(images)).logits
        b = rebuilt(rebuilt.normalize(images)).logits
        fresh = build_segmenter(name, mean=mean, std=std, **ARCHS[name]).eval()
        c = fresh(fresh.normalize(images)).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_bundle_with_other_weights_or_no_architecture_is_refused(tmp_path):
    model = build_segmenter("tiny", width=8)
    meta = segmenter_metadata(model)
    other = build_segmenter("tiny", width=4)
    path = tmp_path / "mismatch.safetensors"
    save_bundle(path, other.state_dict(), meta)
    with pytest.raises(BundleError, match="mismatch.safetensors"):
        segmenter_from_bundle(load_bundle(path), str(path))

    path2 = tmp_path / "noarch.safetensors"
    save_bundle(path2, model.state_dict(), {"kind": "segmenter"})
    with pytest.raises(BundleError, match="architecture"):
        segmenter_from_bundle(load_bundle(path2), str(path2))

    meta_bad = {**meta, "architecture": {"name": "nonexistent"}}
    save_bundle(path2, model.state_dict(), meta_bad)
    with pytest.raises(BundleError, match="nonexistent"):
        segmenter_from_bundle(load_bundle(path2), str(path2))


def test_bundle_prefix_selects_the_segmenter_tensors(tmp_path):
    model = build_segmenter("tiny", width=4).eval()
    tensors = {f"segmenter.{k}": v for k, v in model.state_dict().items()}
    tensors["head.weight"] = torch.zeros(2, 3)
    path = tmp_path / "combo.safetensors"
    save_bundle(path, tensors, {**segmenter_metadata(model), "kind": "densehybrid"})
    rebuilt = segmenter_from_bundle(load_bundle(path), str(path), prefix="segmenter.")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[k], v)


def test_metadata_needs_an_architecture_description():
    with pytest.raises(ValueError, match="build_segmenter"):
        segmenter_metadata(TinySegmenter())


def test_espnetv2_taps_are_the_maps_entering_each_prelu():
    torch.manual_seed(5)
    model = build_segmenter("espnetv2", scale=1.0).eval()
    _randomise_norm_stats(model, 6)
    x = model.normalize(_images(1, 64, 64))
    taps = ["level1", "level2", "level3", "level4"]
    with torch.no_grad():
        out = model(x, embeddings=taps)
        encoded, _ = model.net.base_net(x)
        enc = model.net.base_net
        acts = [
            enc.level1.act,
            enc.level2_0.act,
            enc.level3[-1].module_act,
            enc.level4[-1].module_act,
        ]
        for tap, act, level_out in zip(taps, acts, encoded):
            torch.testing.assert_close(act(out.embeddings[tap]), level_out)
            assert not torch.allclose(out.embeddings[tap], level_out), tap


def test_resize_map_agrees_with_pytorchs_bilinear_and_keeps_gradients(monkeypatch):
    from segmentation_safety.models import segmenter as seg

    calls = []
    real_resize = seg.cv2.resize
    monkeypatch.setattr(seg.cv2, "resize", lambda *a, **k: calls.append(1) or real_resize(*a, **k))
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 3, 24, 40, generator=g) * 5.0
    span = float(maps.max() - maps.min())
    for layout in (torch.contiguous_format, torch.channels_last):
        for size in [(48, 80), (96, 160), (12, 20), (37, 61), (24, 41), (1, 1)]:
            want = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
            calls.clear()
            got = seg.resize_map(maps.contiguous(memory_format=layout), size)
            assert len(calls) == 6  # OpenCV's, plane by plane
            assert got.shape == want.shape and got.dtype == torch.float32
            scale_is_whole = size[0] % 24 == 0 and size[1] % 40 == 0
            tolerance = 1e-6 if scale_is_whole else 2e-5  # of the maps' range
            assert float((got - want).abs().max()) <= tolerance * span, size
    # NaN, ±inf and near-overflow values stay with PyTorch: OpenCV blends an infinite
    # score into NaN around it, and a hazard scored +inf would shrink to a speck.
    for bad in (float("inf"), float("-inf"), float("nan"), 3e38):
        odd = maps[:1, :1].clone()
        odd[0, 0, 5:9, 5:9] = bad
        odd[0, 0, 10, 10] = -bad if bad == 3e38 else bad
        calls.clear()
        got = seg.resize_map(odd, (96, 160))
        want = F.interpolate(odd, size=(96, 160), mode="bilinear", align_corners=False)
        assert not calls and torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
    # Gradients and other dtypes stay PyTorch's.
    assert not seg._opencv_resizes(maps.double(), (48, 80))
    wanted = maps.clone().requires_grad_()
    assert not seg._opencv_resizes(wanted, (48, 80))
    seg.resize_map(wanted, (48, 80)).sum().backward()
    assert wanted.grad is not None and float(wanted.grad.abs().sum()) > 0
    with torch.no_grad():
        assert seg._opencv_resizes(wanted, (48, 80))
    assert seg.resize_map(maps, (24, 40)) is maps
