"""DenseHybrid head, score (eq. 6), loss (eq. 15 as in the official code) and bundle."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from segmentation_safety.checkpoint import Bundle, BundleError, load_bundle, save_bundle
from segmentation_safety.detectors import build
from segmentation_safety.models.densehybrid_head import (
    OUTLIER,
    DenseHybridHead,
    densehybrid_score,
)
from segmentation_safety.models.tiny import TinySegmenter
from training.losses.densehybrid import densehybrid_loss


def _lse(*values: float) -> float:
    return math.log(sum(math.exp(v) for v in values))


def test_head_is_bn_relu_conv1x1_to_two_channels():
    head = DenseHybridHead(6)
    layers = list(head.children())
    assert isinstance(layers[0], nn.BatchNorm2d) and layers[0].num_features == 6
    conv = layers[1]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    assert conv.in_channels == 6 and conv.out_channels == 2 and conv.bias is not None
    # ReLU sits between BN and conv: with BN as identity and negative features, the conv
    # sees zeros and outputs its bias.
    head.eval()
    out = head(-torch.ones(1, 6, 2, 3) * 5.0 - head.norm.running_mean.view(1, -1, 1, 1))
    assert torch.allclose(out, conv.bias.view(1, 2, 1, 1).expand(1, 2, 2, 3))


def test_score_matches_eq6_by_hand():
    logits = torch.tensor([2.0, 0.0, -1.0]).view(1, 3, 1, 1)
    head = torch.tensor([0.5, 1.5]).view(1, 2, 1, 1)  # channel 1 = d_out
    assert OUTLIER == 1
    log_p_out = 1.5 - _lse(0.5, 1.5)  # ln P(d_out|x) = -0.3133
    expected = log_p_out - _lse(2.0, 0.0, -1.0)  # minus ln p̂(x) = 2.1698
    assert densehybrid_score(logits, head).item() == pytest.approx(expected, abs=1e-6)
    assert densehybrid_score(logits, head).item() == pytest.approx(-2.483108, abs=1e-5)


def test_score_is_finite_where_softmax_underflows_and_ranks_outliers_higher():
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    # Pixel 0: head is sure it is an inlier (P(out) = e^-200 underflows in float32).
    head = torch.tensor([[200.0, 0.0], [0.0, 0.0]]).view(1, 2, 1, 2)
    score = densehybrid_score(logits, head)
    assert torch.isfinite(score).all()
    assert score[0, 0, 0].item() == pytest.approx(-200.0 - math.log(2), abs=1e-3)
    assert score[0, 0, 1] > score[0, 0, 0]
    # Lower unnormalised likelihood (smaller logits) -> more anomalous, same head.
    low = densehybrid_score(torch.full((1, 2, 1, 1), -3.0), torch.zeros(1, 2, 1, 1))
    high = densehybrid_score(torch.full((1, 2, 1, 1), 3.0), torch.zeros(1, 2, 1, 1))
    assert low.item() > high.item()
    assert low.item() - high.item() == pytest.approx(6.0, abs=1e-5)


def test_detector_reads_the_head_through_its_logit_margin():
    # The detector computes ln P(d_out|x) from one difference row of the head's conv; it
    # must equal eq. 6 on the head's full two-channel output.
    torch.manual_seed(0)
    seg = TinySegmenter(num_classes=5, width=4).eval()
    det = build("densehybrid", seg).eval()
    with torch.no_grad():
        for p in det.head.parameters():
            p.normal_()
        det.head.norm.running_mean.normal_()
        det.head.norm.running_var.uniform_(0.5, 2.0)
        out = seg(torch.randn(1, 3, 32, 48))
        expected = densehybrid_score(out.logits, det.head(out.features))
        torch.testing.assert_close(det(out).anomaly, expected, atol=1e-5, rtol=1e-5)


def test_loss_terms_match_hand_computation():
    # Pixel 0 inlier with class 0; pixel 1 a pasted negative whose target (1) must be ignored.
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [-1.0, 0.5]]).view(1, 3, 1, 2)
    logits.requires_grad_(True)
    head = torch.tensor([[0.3, -0.2], [0.1, 0.8]]).view(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    outlier = torch.tensor([[[False, True]]])
    beta = 0.03
    total, parts = densehybrid_loss(logits, head, target, outlier, beta=beta)

    seg = _lse(2.0, 0.0, -1.0) - 2.0  # -ln softmax(pixel 0)[0]
    lse_out = _lse(1.0, 3.0, 0.5)  # ln p̂ of the negative pixel
    ce_in = _lse(0.3, 0.1) - 0.3  # head, pixel 0, target d_in (channel 0)
    ce_out = _lse(-0.2, 0.8) - 0.8  # head, pixel 1, target d_out (channel 1)
    head_ce = (ce_in + ce_out) / 2
    assert parts["seg"].item() == pytest.approx(seg, abs=1e-6)
    assert parts["outlier_lse"].item() == pytest.approx(lse_out, abs=1e-6)
    assert parts["head"].item() == pytest.approx(head_ce, abs=1e-6)
    assert total.item() == pytest.approx(seg + beta * lse_out + 10 * beta * head_ce, abs=1e-6)

    # Minimising lowers the negative's likelihood: its logit gradient is +beta * softmax
    # (the segmentation term ignores it), so gradient descent pushes every logit down.
    total.backward()
    s = [1.0, 3.0, 0.5]
    softmax = [math.exp(v - lse_out) for v in s]
    assert logits.grad[0, :, 0, 1].tolist() == pytest.approx([beta * p for p in softmax])


def test_loss_without_negatives_is_finite_and_resizes_low_resolution_outputs():
    logits = torch.randn(2, 4, 4, 8)
    head = torch.randn(2, 2, 4, 8)
    target = torch.randint(0, 4, (2, 16, 32))
    none = torch.zeros(2, 16, 32, dtype=torch.bool)
    total, parts = densehybrid_loss(logits, head, target, none)
    assert parts["outlier_lse"].item() == 0.0
    assert torch.isfinite(total)
    # All-ignored segmentation (a fully pasted crop) must not give nan either.
    total, parts = densehybrid_loss(logits, head, target, torch.ones_like(none))
    assert parts["seg"].item() == 0.0 and torch.isfinite(total)
    with pytest.raises(ValueError, match="outlier_mask"):
        densehybrid_loss(logits, head, target, none[:, :8])


def test_detector_runs_end_to_end_and_bundle_round_trips(tmp_path):
    torch.manual_seed(0)
    seg = TinySegmenter(num_classes=5, width=8).eval()
    det = build("densehybrid", seg)
    # Give the head non-default BN statistics so a lost buffer would show.
    det.head.norm.running_mean.uniform_(-1, 1)
    det.head.norm.running_var.uniform_(0.5, 2)
    det.eval()
    images = torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = seg(seg.normalize(images))
        anomaly = det(out).anomaly
    assert anomaly.shape == (2, 8, 16) and anomaly.dtype == torch.float32
    assert torch.isfinite(anomaly).all()
    # ln P(d_out|x) <= 0, so the score never exceeds -logsumexp(logits).
    assert (anomaly <= -torch.logsumexp(out.logits, dim=1) + 1e-6).all()

    det.thresholds = {"open_set": float(anomaly.median())}
    tensors, meta = det.export_part("densehybrid")
    path = tmp_path / "densehybrid.safetensors"
    save_bundle(path, tensors, meta)
    fresh = build("densehybrid", seg).eval()
    fresh.load_part("densehybrid", load_bundle(path, kind="densehybrid"), path)
    with torch.no_grad():
        assert torch.equal(fresh(out).anomaly, anomaly)
    assert fresh.thresholds == det.thresholds

    labels = out.logits.argmax(dim=1)
    fused = fresh.open_set_labels(labels, anomaly)
    assert torch.equal(fused == 5, anomaly >= det.thresholds["open_set"])
    assert torch.equal(fused[fused != 5], labels[fused != 5])


def test_mismatched_densehybrid_bundle_is_refused_by_name(tmp_path):
    det = build("densehybrid", TinySegmenter(num_classes=5, width=8))
    tensors, meta = det.export_part()
    path = tmp_path / "dh.safetensors"
    save_bundle(path, tensors, meta)
    wider = build("densehybrid", TinySegmenter(num_classes=5, width=16))
    with pytest.raises(BundleError, match="dh.safetensors.*trained on segmenter sha256:"):
        wider.load_part("densehybrid", load_bundle(path), path)
    # A bundle from before fingerprints still meets the shape checks (with a warning).
    legacy = Bundle(tensors, {k: v for k, v in meta.items() if k != "segmenter"})
    with pytest.warns(UserWarning, match="no segmenter fingerprint"):
        with pytest.raises(BundleError, match="dh.safetensors.*feature channels"):
            wider.load_part("densehybrid", legacy, path)
        other_k = build("densehybrid", TinySegmenter(num_classes=7, width=8))
        with pytest.raises(BundleError, match="classes"):
            other_k.load_part("densehybrid", legacy, path)
    broken = dict(tensors)
    broken.pop("conv.bias")
    save_bundle(path, broken, meta)
    with pytest.raises(BundleError, match="do not match"):
        det.load_part("densehybrid", load_bundle(path), path)
    with pytest.raises(KeyError, match="open_set"):
        det.open_set_labels(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))


def test_refusal_names_the_fine_tuned_segmenter_and_what_to_do(tmp_path):
    # The trainer writes the fine-tuned segmenter beside the head while the models
    # directory keeps the base one; the refusal must point at the fine-tuned file, not say
    # "trained on segmenter.safetensors, not on segmenter.safetensors".
    from segmentation_safety.models.zoo import describe_segmenter

    torch.manual_seed(0)
    base_net = TinySegmenter(num_classes=5, width=8)
    base_net.source = str(tmp_path / "segmenter.safetensors")
    tuned = TinySegmenter(num_classes=5, width=8)
    tensors, meta = build("densehybrid", tuned).export_part()
    meta.update(segmenter_bundle="densehybrid_segmenter.safetensors",
                fine_tuned_from=describe_segmenter(base_net))  # fmt: skip
    path = tmp_path / "densehybrid.safetensors"
    save_bundle(path, tensors, meta)
    fine_tuned = tmp_path / "densehybrid_segmenter.safetensors"
    fine_tuned.write_bytes(b"")  # only its presence is looked at
    det = build("densehybrid", base_net)
    with pytest.raises(BundleError) as refused:
        det.load_part("densehybrid", load_bundle(path), path)
    message = str(refused.value)
    assert f"trained with the fine-tuned segmenter {fine_tuned} (sha256:" in message
    assert f"base segmenter it was fine-tuned from, {base_net.source} (sha256:" in message
    assert f"use {fine_tuned} as {tmp_path / 'segmenter.safetensors'}" in message

    # Gone: nothing to switch to, so retrain.
    fine_tuned.unlink()
    with pytest.raises(BundleError, match="densehybrid_segmenter.safetensors is not there"):
        det.load_part("densehybrid", load_bundle(path), path)
    # Loaded from the very file the head names, yet another fingerprint: replaced since.
    det.segmenter.source = str(fine_tuned)
    fine_tuned.write_bytes(b"")
    with pytest.raises(BundleError, match="was replaced since: retrain densehybrid"):
        det.load_part("densehybrid", load_bundle(path), path)
    # Not the base either: say only that it is not the one loaded here.
    other = build("densehybrid", TinySegmenter(num_classes=5, width=8))
    with pytest.raises(BundleError, match="not with the segmenter loaded here, TinySegmenter"):
        other.load_part("densehybrid", load_bundle(path), path)


# -- negatives: the world's or the real ADE20k release (DenseHybrid §7.4) ---------------------
NEG_H, NEG_W = 16, 24


def _ade20k(root: Path) -> Path:
    """Two training images in the ADE20k release layout, with instance annotations (red
    = category, green = instance id): the first has two instances and an unlabelled
    region (category without instance id), the second none at all."""
    import numpy as np
    from PIL import Image

    release = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    first = np.zeros((NEG_H, NEG_W, 3), np.uint8)
    first[2:6, 3:9] = (12, 1, 0)
    first[10:14, 15:20] = (40, 2, 0)
    first[0, :] = (5, 0, 0)  # instance id 0: no instance whatever the category
    for name, ann in (("ADE_train_00000001", first), ("ADE_train_00000002", 0 * first)):
        for folder, array, suffix in (("images", rng.integers(0, 256, first.shape), ".jpg"),
                                      ("annotations_instance", ann, ".png")):  # fmt: skip
            path = release / folder / "training" / f"{name}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array.astype(np.uint8)).save(path)
    return root


def test_ade20k_release_gives_images_with_their_instance_masks(tmp_path):
    from training.engine import NegativeImages

    for folder in (_ade20k(tmp_path), tmp_path / "ADEChallengeData2016"):
        negatives = NegativeImages(tmp_path / "world", folder)
        assert len(negatives) == 2 and negatives.layout == "ade20k"
        image, instances = negatives[0]
        assert image.shape == (3, NEG_H, NEG_W) and image.dtype == torch.uint8
        assert instances.dtype == torch.int64 and instances.shape == (NEG_H, NEG_W)
        expected = torch.zeros(NEG_H, NEG_W, dtype=torch.bool)
        expected[2:6, 3:9] = expected[10:14, 15:20] = True
        assert torch.equal(instances > 0, expected)  # the union pasting takes
        assert len(instances[2:6, 3:9].unique()) == 1 and instances[2, 3] != instances[10, 15]
        assert int(negatives[1][1].max()) == 0  # no instance: rectangles only


def test_pasting_an_ade20k_negative_pastes_the_union_of_its_instances(tmp_path):
    from training.engine import NegativeImages
    from training.train_densehybrid import paste

    negatives = NegativeImages(tmp_path, _ade20k(tmp_path))
    config = {"negative_scale": 1.0, "p_rect": 0.0}  # instance mode whenever there are any
    image = torch.zeros(3, NEG_H, NEG_W, dtype=torch.uint8)
    label = torch.zeros(NEG_H, NEG_W, dtype=torch.long)
    union = negatives[0][1] > 0
    seen = set()
    for seed in range(8):
        _, target, outlier = paste(
            image, label, negatives, torch.Generator().manual_seed(seed), config
        )
        rows, cols = outlier.any(1).nonzero().flatten(), outlier.any(0).nonzero().flatten()
        box = outlier[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        if bool(box.all()):  # the second negative has no instance: a rectangle
            seen.add("rectangle")
        else:  # the first: its two instances, shifted together, nothing else
            assert torch.equal(box, union[2:14, 3:20])
            seen.add("instances")
        assert bool((target[outlier] == 255).all()) and bool((target[~outlier] == 0).all())
    assert seen == {"rectangle", "instances"}


def test_a_folder_without_negatives_is_named_with_the_layouts(tmp_path):
    from training.engine import DataError, NegativeImages

    with pytest.raises(DataError, match=f"no folder of negatives at {tmp_path / 'negatives'}"):
        NegativeImages(tmp_path)
    empty = tmp_path / "ade"
    (empty / "annotations_instance" / "training").mkdir(parents=True)
    with pytest.raises(DataError) as refused:
        NegativeImages(tmp_path, empty)
    message = str(refused.value)
    assert f"no images in {empty / 'images' / 'training'}" in message
    assert "images/*.png with masks/*.png" in message and "annotations_instance/" in message


def test_densehybrid_trains_on_ade20k_negatives(tmp_path):
    import argparse

    from segmentation_safety.models.zoo import build_segmenter, segmenter_metadata
    from training import train_densehybrid
    from training.config import load_config
    from training.world import write_world

    world = tmp_path / "world"
    write_world(world, seed=0, train=2, val=1, anomaly=0, sequences=0, height=32, width=64,
                negatives=0, negative_scenes=0, progress=False)  # fmt: skip
    torch.manual_seed(0)
    seg = build_segmenter("tiny", num_classes=19, width=4)
    save_bundle(tmp_path / "base.safetensors", seg.state_dict(), segmenter_metadata(seg))
    config = load_config("densehybrid", None, {
        "device": "cpu", "amp": False, "iterations": 1, "batch_size": 1, "workers": 0,
        "crop_size": [32, 64], "scene_probability": 0.0, "checkpoint_every": 1,
        "segmenter": str(tmp_path / "base.safetensors"),
    })  # fmt: skip
    out = tmp_path / "dh" / "densehybrid.safetensors"
    args = argparse.Namespace(model="densehybrid", data=world, out=out,
                              negatives=_ade20k(tmp_path / "ade"))  # fmt: skip
    metrics = train_densehybrid.train(config, args)
    assert math.isfinite(metrics["open_set"])
    training = load_bundle(out, kind="densehybrid").metadata["training"]
    release = (tmp_path / "ade" / "ADEChallengeData2016").resolve()
    assert training["negatives"] == {"folder": str(release.parent), "layout": "ade20k"}


def test_log_sigmoid_is_torchs_within_float_rounding_and_trains_as_torchs():
    from segmentation_safety.models.log_sigmoid import log_sigmoid

    x = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([-1e30, 1e30, 0.0])])
    ours, reference = log_sigmoid(x), torch.nn.functional.logsigmoid(x)
    # 1 + z rounds below z = 6e-8; the rest is a rounding of the result.
    bound = 6e-8 + 2 * torch.finfo(torch.float32).eps * reference.abs()
    assert bool(((ours - reference).abs() <= bound).all())
    assert not torch.equal(ours, reference)  # computed its own way (log1p's differ)
    special = torch.tensor([float("inf"), float("-inf"), float("nan")])
    assert log_sigmoid(special)[:2].tolist() == [0.0, float("-inf")]
    assert torch.isnan(log_sigmoid(special)[2])
    # Training gets torch's, whose gradient at 0 is 1/2.
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(log_sigmoid(x).sum(), x)
    assert grad[-1].item() == 0.5
