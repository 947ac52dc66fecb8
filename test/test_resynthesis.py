"""SynthCP resynthesis: SPADE, GAN and comparison losses, the detector, bundles, folds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segmentation_safety.checkpoint import Bundle, BundleError, load_bundle, save_bundle
from segmentation_safety.detectors import build
from segmentation_safety.detectors.resynthesis import (
    feature_cosine_distance,
    labels_to_network_input,
    msp_postprocess,
    resynthesize,
)
from segmentation_safety.models.comparison import ComparisonNet
from segmentation_safety.models.generator import (
    SPADE,
    MultiscaleDiscriminator,
    SpadeGenerator,
    one_hot_labels,
)
from segmentation_safety.models.tiny import TinySegmenter
from training.folds import cross_validation_folds
from training.losses.synthcp import (
    correct_targets,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
    iou_loss,
    iou_targets,
    pixel_correct_loss,
)

torch.set_num_threads(1)

K = 5
TINY_G = {"ngf": 4, "num_upsampling": 3, "hidden": 8, "norm": "instance"}
TINY_C = {"width": 8, "layers": [1, 1, 1, 1], "fuse_channels": 4}


def _tiny_detector(name: str = "resynthesis", **options: object):
    torch.manual_seed(0)
    seg = TinySegmenter(num_classes=K, width=8).eval()
    parts = {"generator": TINY_G}
    if name == "resynthesis":
        parts["comparison"] = TINY_C
    return seg, build(name, seg, preset="tiny", **parts, **options).eval()


# --- SPADE -----------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_spade_normalises_then_modulates_per_pixel_by_label(norm: str) -> None:
    spade = SPADE(channels=1, label_channels=2, hidden=2, norm=norm).train()
    g, b = (0.5, -0.25), (0.1, -0.2)  # gamma - 1 and beta for class 0, 1
    with torch.no_grad():
        for conv in (spade.shared[0], spade.gamma, spade.beta):
            conv.weight.zero_()
            conv.bias.zero_()
        # Only the centre tap: hidden unit j is the one-hot of class j at that pixel.
        spade.shared[0].weight[0, 0, 1, 1] = 1.0
        spade.shared[0].weight[1, 1, 1, 1] = 1.0
        spade.gamma.weight[0, :, 1, 1] = torch.tensor(g)
        spade.beta.weight[0, :, 1, 1] = torch.tensor(b)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])
    labels = torch.tensor([[[0, 1], [1, 0]]])
    out = spade(x, one_hot_labels(labels, 2))

    mean, var = 3.0, (4 + 1 + 0 + 9) / 4  # biased variance, as normalisation uses
    values = [[1.0, 2.0], [3.0, 6.0]]
    expected = torch.tensor(
        [
            [
                (values[i][j] - mean) / math.sqrt(var + 1e-5) * (1 + g[labels[0, i, j]])
                + b[labels[0, i, j]]
                for j in range(2)
            ]
            for i in range(2)
        ]
    )
    torch.testing.assert_close(out[0, 0], expected, rtol=1e-5, atol=1e-5)


def test_one_hot_labels_void_is_all_zero_and_bad_ids_refused() -> None:
    oh = one_hot_labels(torch.tensor([[[0, 2, 255]]]), 3)
    assert oh[0, :, 0, 0].tolist() == [1, 0, 0]
    assert oh[0, :, 0, 1].tolist() == [0, 0, 1]
    assert oh[0, :, 0, 2].tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        one_hot_labels(torch.tensor([[[3]]]), 3)


def test_generator_output_shape_and_range_any_size() -> None:
    torch.manual_seed(0)
    gen = SpadeGenerator(K, **TINY_G)
    labels = torch.randint(0, K, (2, 30, 50))
    labels[:, :3] = 255
    with torch.no_grad():
        img = gen(labels)
        other = gen(torch.zeros_like(labels))
    assert img.shape == (2, 3, 30, 50)
    assert img.dtype == torch.float32
    assert float(img.abs().max()) <= 1.0
    # The image depends on the label map: SPADE conditions every block on it.
    assert not torch.allclose(img, other)


def test_discriminator_outputs_per_scale_and_gradients_reach_generator() -> None:
    torch.manual_seed(0)
    gen = SpadeGenerator(K, **TINY_G)
    disc = MultiscaleDiscriminator(K, ndf=4, n_layers=3, num_d=2)
    labels = torch.randint(0, K, (1, 32, 64))
    outs = disc(labels, gen(labels))
    assert len(outs) == 2 and all(len(o) == 4 for o in outs)
    assert outs[0][-1].shape[1] == 1
    assert outs[1][-1].shape[-1] < outs[0][-1].shape[-1]  # second scale sees half the image
    real = disc(labels, torch.rand(1, 3, 32, 64) * 2 - 1)
    generator_loss(outs, real).backward()
    assert gen.conv_img.weight.grad is not None and gen.conv_img.weight.grad.abs().sum() > 0


# --- GAN losses --------------------------------------------------------------------------


def test_hinge_discriminator_loss_hand_case() -> None:
    real = [[torch.tensor([0.5, 2.0])], [torch.tensor([-1.0, 1.0])]]
    fake = [[torch.tensor([-2.0, 0.5])], [torch.tensor([0.0, -1.0])]]
    # scale 0: real mean(0.5, 0) = 0.25, fake mean(0, 1.5) = 0.75
    # scale 1: real mean(2, 0) = 1.0,    fake mean(1, 0) = 0.5
    expected = (0.25 + 1.0) / 2 + (0.75 + 0.5) / 2
    assert float(discriminator_loss(real, fake)) == pytest.approx(expected)


def test_generator_loss_adversarial_plus_feature_matching_hand_case() -> None:
    fake = [[torch.tensor([1.0, 3.0]), torch.tensor([0.5, -1.5])]]
    real = [[torch.tensor([2.0, 1.0]), torch.tensor([9.0, 9.0])]]
    fm = (1.0 + 2.0) / 2  # L1 mean on the intermediate layer; score layer excluded
    assert float(feature_matching_loss(fake, real)) == pytest.approx(fm)
    adversarial = -(0.5 - 1.5) / 2
    assert float(generator_loss(fake, real, feat_weight=10.0)) == pytest.approx(
        adversarial + 10.0 * fm
    )


# --- comparison targets and losses -------------------------------------------------------


def test_iou_targets_hand_case_ignore_void() -> None:
    pred = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
    gt = torch.tensor([[[0, 1, 1], [255, 2, 0]]])
    iou, present = iou_targets(pred, gt, 4)
    torch.testing.assert_close(iou[0], torch.tensor([1 / 3, 1 / 2, 1 / 2, 0.0]))
    assert present[0].tolist() == [True, True, True, False]


def test_iou_loss_masks_absent_classes() -> None:
    pred_iou = torch.tensor([[0.5, 0.5, 0.5, 0.9]], requires_grad=True)
    target = torch.tensor([[1 / 3, 1 / 2, 1 / 2, 0.0]])
    present = torch.tensor([[True, True, True, False]])
    loss = iou_loss(pred_iou, target, present, beta=1.0)
    assert float(loss.detach()) == pytest.approx(0.5 * (1 / 6) ** 2 / 3)  # smooth-L1 quadratic part
    assert float(iou_loss(pred_iou, target, present, beta=0.0).detach()) == pytest.approx(
        (1 / 6) / 3
    )
    loss.backward()
    assert float(pred_iou.grad[0, 3]) == 0.0  # the absent class gets no signal


def test_correct_targets_and_pixel_bce_masks_void() -> None:
    pred = torch.tensor([[[3, 1, 2, 0]]])
    gt = torch.tensor([[[3, 2, 255, 1]]])
    correct, valid = correct_targets(pred, gt)
    assert correct.tolist() == [[[1.0, 0.0, 0.0, 0.0]]]
    assert valid.tolist() == [[[True, True, False, True]]]
    logit = torch.tensor([[[[0.0, 2.0, -50.0, 5.0]]]])  # B×1×H×W; the void logit would dominate
    expected = (math.log(2.0) + math.log(1 + math.e**2) + math.log(1 + math.e**5)) / 3
    assert float(pixel_correct_loss(logit, correct, valid)) == pytest.approx(expected, rel=1e-5)
    weight = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
    weighted = pixel_correct_loss(logit, correct, valid, weight=weight)
    assert float(weighted) == pytest.approx(math.log(2.0) / 3, rel=1e-5)


# --- comparison net ----------------------------------------------------------------------


def test_comparison_net_shapes_ranges_and_pixel_head_equals_upsample_then_conv() -> None:
    torch.manual_seed(0)
    net = ComparisonNet(K, **TINY_C).eval()
    x, s = torch.randn(2, 3, 32, 48), torch.randn(2, 3, 32, 48)
    probs = torch.randn(2, K, 32, 48).softmax(1)
    with torch.no_grad():
        _check_comparison(net, x, s, probs)


def _check_comparison(net, x, s, probs) -> None:
    out = net(x, s, probs)
    assert out.class_iou.shape == (2, K)
    assert float(out.class_iou.min()) >= 0 and float(out.class_iou.max()) <= 1
    assert out.correct_logit.shape == (2, 1, 32, 48)

    # The official order: upsample every fused stage to full size, concat, 1×1 conv.
    pred = net.pred_proj(probs)
    fx = net.encoder_image(torch.cat([x, pred], 1))
    fs = net.encoder_synth(torch.cat([s, pred], 1))
    ups = [
        F.interpolate(f(torch.cat([a, b], 1)), size=(32, 48), mode="bilinear")
        for a, b, f in zip(fx, fs, net.fuse, strict=True)
    ]
    naive = net.pixel_head(torch.cat(ups, 1))
    torch.testing.assert_close(out.correct_logit, naive, rtol=1e-4, atol=1e-5)


def test_comparison_default_is_resnet18_with_four_channel_stem() -> None:
    net = ComparisonNet(19)
    enc = net.encoder_image
    assert enc.conv1.weight.shape == (64, 4, 7, 7)
    assert [len(s) for s in (enc.layer1, enc.layer2, enc.layer3, enc.layer4)] == [2, 2, 2, 2]
    assert enc.layer4[0].conv1.out_channels == 512
    # Two encoders, not one shared: distinct parameters.
    assert net.encoder_image.conv1.weight is not net.encoder_synth.conv1.weight


# --- anomaly score -----------------------------------------------------------------------


def test_feature_cosine_distance_hand_vectors() -> None:
    a = torch.tensor([[1.0, 1.0, 1.0, 3.0], [0.0, 1.0, 0.0, 4.0]]).view(1, 2, 1, 4)
    b = torch.tensor([[0.0, 2.0, -1.0, 4.0], [1.0, 2.0, 0.0, 3.0]]).view(1, 2, 1, 4)
    d = feature_cosine_distance(a, b)
    torch.testing.assert_close(d, torch.tensor([[[1.0, 0.0, 2.0, 1.0 - 24 / 25]]]))


def test_msp_postprocess_hand_case() -> None:
    score = torch.tensor([0.3, 0.8, 0.6])
    msp = torch.tensor([0.5, 0.9995, 0.999])
    out = msp_postprocess(score, msp, 0.999)
    torch.testing.assert_close(out, torch.tensor([0.3, 0.0005, 0.6]))  # 0.999 is not > t
    torch.testing.assert_close(msp_postprocess(score, msp, 1.0), score)


def test_labels_to_network_input_maps_tanh_range_through_segmenter_norm() -> None:
    seg = TinySegmenter(num_classes=K, width=8)
    synth = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    out = labels_to_network_input(synth, seg)
    for c, (m, s) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)):
        torch.testing.assert_close(out[0, c, 0], torch.tensor([-m / s, (0.5 - m) / s, (1 - m) / s]))


# --- detector ----------------------------------------------------------------------------


def test_detector_end_to_end_shapes_dtypes_ranges() -> None:
    seg, det = _tiny_detector()
    images = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = det(seg(seg.normalize(images)))
    # anomaly at the logits' resolution (the pipeline resizes it), failure at the frame's
    for m, shape in ((out.anomaly, (2, 8, 16)), (out.failure, (2, 32, 64))):
        assert m.shape == shape and m.dtype == torch.float32
        assert torch.isfinite(m).all()
    assert float(out.anomaly.min()) >= 0 and float(out.anomaly.max()) <= 2
    assert float(out.failure.min()) >= 0 and float(out.failure.max()) <= 1
    assert out.class_iou.shape == (2, K)
    assert float(out.class_iou.min()) >= 0 and float(out.class_iou.max()) <= 1


def test_detector_anomaly_zero_for_perfect_resynthesis_and_msp_threshold_wired() -> None:
    seg, det = _tiny_detector(msp_threshold=1.0)
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        base = seg(x)
        det.synthesize = lambda logits, size: x  # a generator reproducing the input exactly
        assert float(det(base).anomaly.abs().max()) < 1e-5
        det.msp_threshold = 0.0  # every pixel's MSP exceeds 0: score is 1 - MSP everywhere
        expected = 1 - base.logits.softmax(1).max(1).values  # at the logits' resolution
        torch.testing.assert_close(det(base).anomaly, expected)


def test_failure_is_the_probability_the_comparison_calls_the_prediction_wrong() -> None:
    # SynthCP: the comparison net reads (x, G(ŷ), ŷ) and its pixel head gives the logit
    # of "prediction correct"; failure = 1 - sigmoid(that logit), class IoU its IoU head.
    seg, det = _tiny_detector()
    x = torch.randn(1, 3, 32, 64)
    synth = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        base = seg(x)
        det.synthesize = lambda logits, size: synth  # pin G(ŷ) so the inputs are known
        got = det(base)
        ref = det.comparison(x, synth, base.logits.softmax(1))
        swapped = det.comparison(synth, x, base.logits.softmax(1))
    expected = 1.0 - torch.sigmoid(ref.correct_logit[:, 0])
    torch.testing.assert_close(got.failure, expected)
    torch.testing.assert_close(got.class_iou, ref.class_iou)
    # The two encoders differ, so the order of image and synthesis is visible.
    assert not torch.allclose(swapped.correct_logit, ref.correct_logit, atol=1e-4)


def test_anomaly_only_variant_needs_only_the_generator() -> None:
    seg, det = _tiny_detector("resynthesis_anomaly")
    assert det.trained_parts == ("generator",) and det.comparison is None
    with torch.no_grad():
        out = det(seg(torch.randn(1, 3, 32, 64)))
    assert out.anomaly.shape == (1, 8, 16)  # the logits' resolution
    assert out.failure is None and out.class_iou is None
    with pytest.raises(TypeError):
        build("resynthesis_anomaly", seg, comparison=TINY_C)


def test_detector_refuses_missing_image_and_bad_options() -> None:
    seg, det = _tiny_detector()
    out = seg(torch.randn(1, 3, 32, 64))
    out.image = None
    with pytest.raises(ValueError):
        det(out)
    with pytest.raises(ValueError):
        build("resynthesis", seg, preset="huge")
    with pytest.raises(TypeError):
        build("resynthesis", seg, preset="tiny", bogus=1)


def test_bundle_round_trip_restores_both_parts(tmp_path) -> None:
    seg, det = _tiny_detector()
    x = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        before = det(seg(x))
    torch.manual_seed(1)
    fresh = build("resynthesis", seg, preset="tiny", generator={"ngf": 2}).eval()
    for kind in ("generator", "comparison"):
        tensors, meta = det.export_part(kind)
        save_bundle(tmp_path / f"{kind}.safetensors", tensors, meta)
        bundle = load_bundle(tmp_path / f"{kind}.safetensors", kind=kind)
        fresh.load_part(kind, bundle, tmp_path / f"{kind}.safetensors")
    assert fresh.generator.architecture() == det.generator.architecture()  # ngf 4 again
    with torch.no_grad():
        after = fresh(seg(x))
    for name in ("anomaly", "failure", "class_iou"):
        torch.testing.assert_close(getattr(after, name), getattr(before, name))


def test_bundle_for_other_class_count_is_refused_by_name(tmp_path) -> None:
    _, det = _tiny_detector()
    tensors, meta = det.export_part("generator")
    meta["architecture"]["num_classes"] = K + 1
    path = tmp_path / "generator.safetensors"
    save_bundle(path, tensors, meta)
    with pytest.raises(BundleError, match="generator.safetensors"):
        det.load_part("generator", load_bundle(path), path)
    with pytest.raises(BundleError, match="expected 'comparison'"):
        det.load_part("comparison", load_bundle(path), path)
    with pytest.raises(KeyError):
        det.load_part("flow", load_bundle(path), path)


# --- folds -------------------------------------------------------------------------------


def test_cross_validation_folds_disjoint_covering_and_seeded() -> None:
    folds = cross_validation_folds(10, k=4, seed=3)
    assert len(folds) == 4
    held = [i for f in folds for i in f.holdout]
    assert sorted(held) == list(range(10))  # each item held out exactly once
    assert sorted(len(f.holdout) for f in folds) == [2, 2, 3, 3]
    for f in folds:
        assert set(f.train).isdisjoint(f.holdout)
        assert set(f.train) | set(f.holdout) == set(range(10))
    assert folds == cross_validation_folds(10, k=4, seed=3)
    assert folds != cross_validation_folds(10, k=4, seed=4)
    # As many items as folds: each item is a holdout of its own.
    assert sorted(f.holdout for f in cross_validation_folds(4, k=4)) == [(0,), (1,), (2,), (3,)]
    with pytest.raises(ValueError):
        cross_validation_folds(3, k=4)
    with pytest.raises(ValueError):
        cross_validation_folds(10, k=1)


def test_resynthesize_runs_the_generator_at_its_scale_and_returns_frame_size():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, labels):
            seen.append(labels.clone())
            return torch.zeros(labels.shape[0], 3, *labels.shape[-2:])

    seg = TinySegmenter(num_classes=3, width=4)
    logits = torch.zeros(1, 3, 8, 16)  # stride-4 logits of a 32×64 frame
    logits[:, 0, :, :8] = 5.0  # class 0 on the left half, class 2 on the right
    logits[:, 2, :, 8:] = 5.0
    out = resynthesize(Recorder(), logits, seg, size=(32, 64), scale=0.5)
    # ŷ is predicted at the generator's resolution (half the frame), not the logits'
    assert tuple(seen[0].shape) == (1, 16, 32)
    assert (seen[0][:, :, :16] == 0).all() and (seen[0][:, :, 16:] == 2).all()
    assert tuple(out.shape) == (1, 3, 32, 64)
    # generator output 0 in [-1, 1] is grey 0.5, normalised with the segmenter's mean/std
    expected = ((0.5 - seg.mean) / seg.std).expand(1, 3, 32, 64)
    torch.testing.assert_close(out, expected)
    resynthesize(Recorder(), logits, seg, size=(32, 64))
    assert tuple(seen[1].shape) == (1, 32, 64)  # scale 1: the frame's size


def test_comparison_reads_a_low_resolution_prediction_as_its_bilinear_upsampling():
    torch.manual_seed(0)
    net = ComparisonNet(4, width=4, layers=[1, 1, 1, 1], fuse_channels=4).eval()
    with torch.no_grad():
        net.pred_proj[1].running_mean.fill_(0.3)
        net.pred_proj[1].running_var.fill_(0.5)
        image, synth = torch.randn(1, 3, 32, 64), torch.randn(1, 3, 32, 64)
        probs = torch.randn(1, 4, 8, 16).softmax(dim=1)
        upsampled = F.interpolate(probs, size=(32, 64), mode="bilinear", align_corners=False)
        low, full = net(image, synth, probs), net(image, synth, upsampled)
    torch.testing.assert_close(low.correct_logit, full.correct_logit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low.class_iou, full.class_iou, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="larger"):
        net(image[..., :16, :32], synth[..., :16, :32], probs.repeat(1, 1, 4, 4))


def test_generator_bundle_carries_the_synthesis_scale():
    seg = TinySegmenter(num_classes=3, width=4)
    det = build("resynthesis_anomaly", seg, synthesis_scale=0.5)
    tensors, meta = det.export_part("generator")
    assert meta["synthesis_scale"] == 0.5
    other = build("resynthesis_anomaly", seg)
    other.load_part("generator", Bundle(tensors, meta), "g.safetensors")
    assert other.synthesis_scale == 0.5
    with pytest.raises(ValueError, match="synthesis_scale"):
        build("resynthesis_anomaly", seg, synthesis_scale=0.0)


def test_generator_runs_at_the_frame_height_it_was_trained_at():
    seg = TinySegmenter(num_classes=3, width=4)
    tensors, meta = build("resynthesis_anomaly", seg).export_part("generator")
    meta = {**meta, "synthesis_scale": 0.5, "input_size": [16, 32]}
    det = build("resynthesis_anomaly", seg)
    det.load_part("generator", Bundle(tensors, meta), "g.safetensors")
    assert det.scale_for((32, 64)) == 0.5  # the frames it was trained on
    assert det.scale_for((64, 128)) == 0.25  # a finer camera: objects as large as in training
    assert det.scale_for((8, 16)) == 1.0  # never above the frame
    assert det.export_part("generator")[1]["input_size"] == [16, 32]
    fixed = build("resynthesis_anomaly", seg, synthesis_scale=0.5)
    fixed.load_part("generator", Bundle(tensors, meta), "g.safetensors")
    assert fixed.scale_for((64, 128)) == 0.5  # an explicit option wins
    seen = []
    det.generator.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.no_grad():
        det(seg(torch.randn(1, 3, 64, 128)))
    assert seen == [(1, 16, 32)]
