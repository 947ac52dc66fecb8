"""FlowEneDet (its supplementary; DESIGN §4): flow input, layers, mixture base, loss, detectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import multivariate_normal

from segmentation_safety.checkpoint import (
    Bundle,
    BundleError,
    load_bundle,
    load_state_strict,
    save_bundle,
)
from segmentation_safety.detectors.flowenedet import FlowEneDetC, FlowEneDetU, gaussian_smooth
from segmentation_safety.detectors.registry import build
from segmentation_safety.models.flowenedet import (
    ActNorm,
    ConvCoupling,
    FlowEneDet,
    GaussianMixture,
    InvConv1x1,
    energy_flow_input,
    pool_condition,
)
from segmentation_safety.models.tiny import TinySegmenter
from segmentation_safety.types import SegmenterOutput
from training.losses.flowenedet import flowenedet_loss, flowenedet_targets

torch.set_num_threads(1)


def _randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def test_flow_input_by_hand() -> None:
    logits = torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    mean, std = torch.tensor([0.5, 1.0, 0.0]), torch.tensor([1.0, 2.0, 0.5])
    # standardised: [0.5, 0.5, 1.0]; -E = logsumexp
    neg_e = math.log(2 * math.exp(0.5) + math.exp(1.0))
    sig = 1.0 / (1.0 + math.exp(-neg_e))
    z = energy_flow_input(logits, mean, std)
    assert z.shape == (1, 2, 1, 1)
    assert z[0, 0, 0, 0].item() == pytest.approx(math.log(sig), abs=1e-6)
    assert z[0, 1, 0, 0].item() == pytest.approx(math.log(1.0 - sig), abs=1e-6)


def test_flow_input_stays_finite_for_extreme_logits() -> None:
    logits = torch.tensor([[200.0, -50.0], [-300.0, -400.0]]).T.reshape(1, 2, 1, 2)
    z = energy_flow_input(logits, torch.zeros(2), torch.ones(2))
    assert torch.isfinite(z).all()
    # Very confident pixel: log σ(-E) ≈ 0, log(1 - σ(-E)) ≈ E = -200.
    assert z[0, 0, 0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert z[0, 1, 0, 0].item() == pytest.approx(-200.0, rel=1e-5)


def test_pool_condition_by_hand() -> None:
    feats = torch.arange(4.0).view(1, 4, 1, 1)  # channels 0, 1, 2, 3
    assert pool_condition(feats, 2).flatten().tolist() == [0.5, 2.5]
    feats5 = torch.arange(5.0).view(1, 5, 1, 1)  # adaptive bins [0:3], [2:5]
    assert pool_condition(feats5, 2).flatten().tolist() == [1.0, 3.0]


def test_actnorm_formula_logdet_and_inverse() -> None:
    norm = ActNorm(2, data_init=False)
    with torch.no_grad():
        norm.bias.copy_(torch.tensor([1.0, -2.0]).view(1, 2, 1, 1))
        norm.log_scale.copy_(torch.tensor([0.5, -1.5]).view(1, 2, 1, 1))
    x = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1).expand(2, 2, 3, 3).contiguous()
    y, logdet = norm(x)
    expected = torch.tensor([4.0 * math.exp(0.5), 2.0 * math.exp(-1.5)])
    torch.testing.assert_close(y[0, :, 1, 2], expected)
    assert logdet.shape == (2, 3, 3)
    torch.testing.assert_close(logdet, torch.full((2, 3, 3), -1.0))
    torch.testing.assert_close(norm.inverse(y), x)


def test_actnorm_data_init_happens_once() -> None:
    norm = ActNorm(2).train()
    x = torch.randn(4, 2, 5, 5) * torch.tensor([3.0, 0.2]).view(1, 2, 1, 1) + 7.0
    y, _ = norm(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(2), atol=1e-4, rtol=0)
    before = norm.log_scale.detach().clone()
    norm(x * 10.0)
    assert torch.equal(norm.log_scale.detach(), before)
    assert norm.initialized.item() == 1.0


def test_invconv_logdet_and_inverse() -> None:
    conv = InvConv1x1(2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[2.0, 1.0], [0.5, 3.0]]))
    x = torch.randn(3, 2, 4, 4)
    y, logdet = conv(x)
    torch.testing.assert_close(y[:, 0], 2 * x[:, 0] + x[:, 1])
    torch.testing.assert_close(y[:, 1], 0.5 * x[:, 0] + 3 * x[:, 1])
    torch.testing.assert_close(logdet, torch.full((3, 4, 4), math.log(5.5)))
    torch.testing.assert_close(conv.inverse(y), x, atol=1e-5, rtol=0)


def test_invconv_logdet_of_a_2x2_and_its_gradient_are_slogdets() -> None:
    # 2×2 weights take a closed form: the same value and gradient, negative det included.
    torch.manual_seed(0)
    for _ in range(20):
        conv = InvConv1x1(2).double()
        with torch.no_grad():
            conv.weight.copy_(torch.randn(2, 2, dtype=torch.float64) * 3)
        ours = conv.log_abs_det()
        (grad,) = torch.autograd.grad(ours, conv.weight)
        w = conv.weight.detach().clone().requires_grad_(True)
        reference = torch.linalg.slogdet(w)[1]
        (expected,) = torch.autograd.grad(reference, w)
        torch.testing.assert_close(ours, reference)
        torch.testing.assert_close(grad, expected)
    assert InvConv1x1(3).log_abs_det().shape == ()  # other sizes: slogdet


def _random_model(conditional: bool, seed: int = 0) -> FlowEneDet:
    torch.manual_seed(seed)
    model = FlowEneDet(
        num_classes=4,
        feature_channels=8,
        conditional=conditional,
        blocks=2,
        kernel_size=3,
        cond_channels=4,
        hidden=6,
        data_init=False,
    ).double()
    _randomize(model, seed)
    return model.eval()


@pytest.mark.parametrize("conditional", [False, True])
def test_flow_logdet_matches_autograd_jacobian_over_the_map(conditional: bool) -> None:
    model = _random_model(conditional)
    z = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    ctx = model.context(torch.randn(1, 8, 3, 3, dtype=torch.float64), z.shape[-2:])
    _, logdet = model.forward_flow(z, ctx)
    # The K×K subnet mixes neighbouring pixels, but the Jacobian of the whole map stays
    # triangular, so its log-det is the sum of the per-pixel terms.
    jac = torch.autograd.functional.jacobian(lambda v: model.forward_flow(v, ctx)[0], z)
    sign, expected = torch.linalg.slogdet(jac.reshape(18, 18))
    assert sign.item() != 0
    assert logdet.sum().item() == pytest.approx(expected.item(), abs=1e-8)
    assert abs(expected.item()) > 0.1


@pytest.mark.parametrize("conditional", [False, True])
def test_flow_inverse_is_exact(conditional: bool) -> None:
    model = _random_model(conditional).float()
    z = torch.randn(2, 2, 5, 6)
    ctx = model.context(torch.randn(2, 8, 5, 6), z.shape[-2:])
    u, _ = model.forward_flow(z, ctx)
    assert not torch.allclose(u, z, atol=1e-2)
    torch.testing.assert_close(model.inverse_flow(u, ctx), z, atol=1e-5, rtol=0)


def test_coupling_starts_as_identity() -> None:
    coupling = ConvCoupling(2, flip=False, kernel_size=7).eval()
    x = torch.randn(1, 2, 4, 4)
    y, logdet = coupling(x)
    torch.testing.assert_close(y, x)
    assert torch.equal(logdet, torch.zeros(1, 4, 4))


def test_mixture_log_prob_matches_scipy() -> None:
    base = GaussianMixture(2, 2).double()
    init_u = base.precision_factor().detach()
    torch.testing.assert_close(init_u, torch.eye(2, dtype=torch.float64).expand(2, 2, 2))
    _randomize(base, seed=4, std=0.7)
    u = torch.randn(1, 2, 2, 3, dtype=torch.float64)
    got = base.component_log_prob(u).detach()
    factor = base.precision_factor().detach().numpy()
    assert np.allclose(np.triu(factor, k=1), 0) and (np.diagonal(factor, 0, 1, 2) > 0).all()
    log_w = torch.log_softmax(base.w.detach(), 0).numpy()
    points = u[0].permute(1, 2, 0).reshape(-1, 2).numpy()
    for k in range(2):
        cov = np.linalg.inv(factor[k].T @ factor[k])  # precision = Uᵀ U
        expected = log_w[k] + multivariate_normal(base.mu[k].detach().numpy(), cov).logpdf(points)
        np.testing.assert_allclose(got[0, k].reshape(-1).numpy(), expected, atol=1e-10)


def test_p_wrong_is_the_softmax_of_component_likelihoods() -> None:
    model = _random_model(False)
    logits = torch.randn(2, 4, 5, 5, dtype=torch.float64) * 3
    joint = model(logits)
    expected = 1.0 / (1.0 + torch.exp(joint[:, 0] - joint[:, 1]))
    torch.testing.assert_close(model.p_wrong(logits), expected)


def test_targets_and_loss_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 5.0]]).view(1, 2, 1, 3)  # argmax 0,1,1
    labels = torch.tensor([[0, 0, 255]]).view(1, 1, 3)
    wrong, ignore = flowenedet_targets(logits, labels)
    assert wrong.tolist() == [[[False, True, False]]]
    assert ignore.tolist() == [[[False, False, True]]]
    out = torch.tensor([[0.0, 1.0, 7.0], [2.0, -1.0, 0.0]]).view(1, 2, 1, 3)
    loss = flowenedet_loss(out, wrong, ignore)
    # pixel 0 correct: -log σ(0 - 2); pixel 1 wrong: -log σ(-1 - 1); pixel 2 ignored.
    expected = 0.5 * (math.log1p(math.exp(2.0)) + math.log1p(math.exp(2.0)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    nothing = flowenedet_loss(out.requires_grad_(), wrong, torch.ones_like(ignore))
    nothing.backward()
    assert nothing.item() == 0.0


def test_training_reduces_the_loss_on_a_toy_problem() -> None:
    torch.manual_seed(0)
    model = FlowEneDet(num_classes=3, blocks=2, kernel_size=3, hidden=8, dropout=0.0).train()
    logits = torch.randn(2, 3, 12, 12)
    wrong = logits.max(dim=1).values < 0.3  # low-confidence pixels are the wrong ones
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(40):
        loss = flowenedet_loss(model(logits), wrong)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_gaussian_smooth_keeps_probabilities() -> None:
    maps = torch.zeros(1, 9, 9)
    maps[0, 4, 4] = 1.0
    out = gaussian_smooth(maps, 1.0)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert out[0, 4, 4] < 1.0 and out[0, 4, 5] > 0
    const = torch.full((2, 5, 5), 0.3)
    torch.testing.assert_close(gaussian_smooth(const, 1.0), const)
    assert gaussian_smooth(maps, 0.0) is maps


def test_gaussian_smooth_is_the_7x7_gaussian_with_replicate_border() -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 6, 11, generator=g, dtype=torch.float64)  # smaller than 7 rows too
    x = torch.arange(-3, 4, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / 1.5) ** 2)
    kernel = torch.outer(k, k) / k.sum() ** 2
    padded = F.pad(maps[:, None], (3, 3, 3, 3), mode="replicate")
    expected = F.conv2d(padded, kernel[None, None])[:, 0]
    torch.testing.assert_close(gaussian_smooth(maps, 1.5), expected)


@pytest.mark.parametrize("name", ["flowenedet_u", "flowenedet_c"])
def test_detectors_end_to_end_on_tiny_segmenter(name: str) -> None:
    torch.manual_seed(0)
    seg = TinySegmenter(num_classes=5, width=8).eval()
    det = build(name, seg).eval()
    kind = "flowenedet" if name == "flowenedet_u" else "flowenedet_c"
    assert det.produces == {"anomaly", "failure"} and det.trained_parts == (kind,)
    _randomize(det, seed=1, std=0.5)
    with torch.no_grad():
        result = det(seg(torch.randn(2, 3, 32, 48), det.embeddings))
    assert result.failure.shape == (2, 8, 12) and result.failure.dtype == torch.float32
    assert torch.equal(result.anomaly, result.failure)
    assert (result.failure >= 0).all() and (result.failure <= 1).all()
    assert result.failure.std() > 0
    assert result.class_iou is None


def test_flow_runs_at_a_quarter_of_the_input_and_only_fed_c_reads_features() -> None:
    seg = TinySegmenter(num_classes=4, width=4)
    logits = torch.randn(1, 4, 8, 8)
    image = torch.zeros(1, 3, 64, 64)
    out_a = SegmenterOutput(logits=logits, features=torch.randn(1, 8, 8, 8), image=image)
    out_b = SegmenterOutput(logits=logits, features=torch.randn(1, 8, 8, 8), image=image)
    for cls, reads_features in ((FlowEneDetU, False), (FlowEneDetC, True)):
        det = cls(seg, blocks=2, hidden=6).eval()
        _randomize(det, seed=2, std=0.5)
        with torch.no_grad():
            a, b = det(out_a).failure, det(out_b).failure
        assert a.shape == (1, 16, 16)
        assert torch.equal(a, b) != reads_features


def test_bundle_round_trip_and_variant_mismatch(tmp_path) -> None:
    seg = TinySegmenter(num_classes=4, width=4).eval()
    det = FlowEneDetC(seg, blocks=2, hidden=6).eval()
    _randomize(det, seed=3)
    with torch.no_grad():
        det.model.class_mean.copy_(torch.tensor([0.5, 1.0, -1.0, 2.0]))
    path = tmp_path / "flowenedet.safetensors"
    save_bundle(path, det.state_dict(), {"kind": "flowenedet", "architecture": det.architecture})
    bundle = load_bundle(path, kind="flowenedet")
    arch = dict(bundle.metadata["architecture"])
    assert arch.pop("variant") == "FED-C"
    again = FlowEneDetC(seg, **arch).eval()
    load_state_strict(again, bundle, path)
    with torch.no_grad():
        out = seg(torch.randn(1, 3, 32, 32))
        torch.testing.assert_close(again(out).failure, det(out).failure)
    with pytest.raises(BundleError, match="flowenedet.safetensors"):
        load_state_strict(FlowEneDetU(seg, **arch), bundle, path)


@pytest.mark.parametrize("cls", [FlowEneDetU, FlowEneDetC])
def test_export_load_part_rebuilds_the_trained_architecture(tmp_path, cls) -> None:
    seg = TinySegmenter(num_classes=4, width=4).eval()
    det = cls(seg, blocks=2, kernel_size=3, cond_channels=4, hidden=6, smooth_sigma=0.5).eval()
    _randomize(det, seed=4)
    with torch.no_grad():
        det.model.class_mean.copy_(torch.tensor([0.5, 1.0, -1.0, 2.0]))
        det.model.class_std.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
    kind = det.trained_parts[0]
    tensors, meta = det.export_part()
    assert meta["kind"] == kind and meta["architecture"]["variant"] == det.variant
    path = tmp_path / f"{kind}.safetensors"
    save_bundle(path, tensors, meta)
    fresh = cls(seg).eval()  # defaults: 4 blocks, 7×7, 32 condition channels, hidden 16
    fresh.load_part(kind, load_bundle(path), path)
    assert fresh.architecture == det.architecture and fresh.smooth_sigma == 0.5
    assert not fresh.model.training
    with torch.no_grad():
        out = seg(torch.randn(2, 3, 32, 32))
        torch.testing.assert_close(fresh(out).failure, det(out).failure, rtol=0, atol=0)
    explicit = cls(seg, smooth_sigma=0.0).eval()  # an explicit option beats the bundle's
    explicit.load_part(kind, load_bundle(path), path)
    assert explicit.smooth_sigma == 0.0


def test_load_part_refusals_name_the_file(tmp_path) -> None:
    seg = TinySegmenter(num_classes=4, width=4)
    fed_c = FlowEneDetC(seg, blocks=1, hidden=4)
    tensors, meta = fed_c.export_part()
    assert meta["kind"] == "flowenedet_c"
    path = str(tmp_path / "flowenedet.safetensors")
    arch = meta["architecture"]
    bad = {
        "kind": {**meta, "kind": "flow"},
        "no architecture": {k: v for k, v in meta.items() if k != "architecture"},
        "lacks": {**meta, "architecture": {k: v for k, v in arch.items() if k != "blocks"}},
        "weights": {**meta, "architecture": {**arch, "hidden": 8}},
    }
    for why, metadata in bad.items():
        with pytest.raises(BundleError, match="flowenedet.safetensors") as err:
            fed_c.load_part("flowenedet_c", Bundle(tensors, metadata), path)
        assert err.value.path == path, why
    with pytest.raises(BundleError, match="'FED-C'.*flowenedet_c"):
        FlowEneDetU(seg).load_part(
            "flowenedet", Bundle(tensors, {**meta, "kind": "flowenedet"}), path
        )
    with pytest.raises(BundleError, match="trained on segmenter sha256:.*not on the segmenter"):
        FlowEneDetC(TinySegmenter(num_classes=5, width=4)).load_part(
            "flowenedet_c", Bundle(tensors, meta), path
        )
    # A bundle from before fingerprints still meets the shape checks (with a warning).
    legacy = {k: v for k, v in meta.items() if k != "segmenter"}
    with pytest.warns(UserWarning, match="no segmenter fingerprint"):
        with pytest.raises(BundleError, match="4 classes, the segmenter has 5"):
            FlowEneDetC(TinySegmenter(num_classes=5, width=4)).load_part(
                "flowenedet_c", Bundle(tensors, legacy), path
            )
        with pytest.raises(BundleError, match="8 feature channels, the segmenter has 16"):
            FlowEneDetC(TinySegmenter(num_classes=4, width=8)).load_part(
                "flowenedet_c", Bundle(tensors, legacy), path
            )
    with pytest.raises(KeyError):
        fed_c.load_part("flow", Bundle(tensors, meta), path)


@pytest.mark.parametrize("channels_in", [10, 48, 7])
def test_pool_condition_matches_adaptive_pooling_over_channels(channels_in: int) -> None:
    x = torch.randn(2, channels_in, 5, 7)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 1, channels_in)
    expected = F.adaptive_avg_pool1d(rows, 32).reshape(2, 5, 7, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(pool_condition(x, 32), expected, rtol=1e-5, atol=1e-6)


def _reference_flow(
    model: FlowEneDet, z: torch.Tensor, features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FED-C written the plain way: the pooled, normalised condition concatenated to
    every coupling's input, as the paper draws it."""
    feats = F.interpolate(features, size=z.shape[-2:], mode="bilinear", align_corners=False)
    ctx = model.context_norm(pool_condition(feats, model.cond_channels))[0]
    logdet = torch.zeros(z.shape[0], *z.shape[-2:], dtype=z.dtype)
    for norm, conv, cp in zip(model.actnorms, model.invconvs, model.couplings, strict=True):
        z, ld_norm = norm(z)
        z, ld_conv = conv(z)
        h = torch.sigmoid(cp.inp(torch.cat([z[:, cp.cond_slice], ctx], dim=1)))
        h = torch.sigmoid(cp.mid(F.pad(h, (cp.pad,) * 4, mode="replicate")))
        raw_s, t = cp.out(h).chunk(2, dim=1)
        log_s = 2.0 * torch.tanh(raw_s / 2.0)
        y = z.clone()
        y[:, cp.trans_slice] = z[:, cp.trans_slice] * torch.exp(log_s) + t
        z = y
        logdet = logdet + ld_norm + ld_conv + log_s.sum(dim=1)
    return z, logdet


@pytest.mark.parametrize(
    ("channels_in", "feature_size"),
    [(8, (5, 6)), (8, (3, 4)), (40, (3, 4)), (40, (5, 6))],
)
def test_folded_condition_equals_concatenating_it_to_every_coupling(
    channels_in: int, feature_size: tuple[int, int]
) -> None:
    # 4 blocks × hidden 6 = 24 condition terms: 8 feature channels are resized first,
    # 40 are projected first; both must equal the plain computation.
    model = FlowEneDet(
        num_classes=3, conditional=True, blocks=4, kernel_size=3, cond_channels=4, hidden=6
    ).double()
    model.context_norm.initialized.fill_(1.0)
    _randomize(model, 3)
    model.eval()
    z = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    features = torch.randn(2, channels_in, *feature_size, dtype=torch.float64)
    u, logdet = model.forward_flow(z, model.context(features, z.shape[-2:]))
    u_ref, logdet_ref = _reference_flow(model, z, features)
    assert not torch.allclose(u, z, atol=1e-2)
    torch.testing.assert_close(u, u_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(logdet, logdet_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cls", [FlowEneDetU, FlowEneDetC])
def test_detector_smooths_the_flows_p_wrong_on_bilinear_logits_at_a_quarter(cls) -> None:
    # The map is the 7×7 Gaussian (σ from the detector) of the model's P(wrong) on the
    # logits resized bilinearly to 1/4 of the image; σ = 0 leaves it unsmoothed.
    torch.manual_seed(0)
    seg = TinySegmenter(num_classes=4, width=4)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 5, 7, generator=g) * 2
    out = SegmenterOutput(
        logits=logits,
        features=torch.randn(1, 8, 5, 7, generator=g),
        image=torch.zeros(1, 3, 48, 64),
    )
    det = cls(seg, blocks=2, hidden=6, smooth_sigma=1.5).eval()
    _randomize(det, seed=5, std=0.1)
    resized = F.interpolate(logits, size=(12, 16), mode="bilinear", align_corners=False)
    with torch.no_grad():
        raw = det.model.p_wrong(resized, out.features if det.conditional else None)
        got = det(out).failure
        det.smooth_sigma = 0.0
        unsmoothed = det(out).failure
    assert raw.std() > 1e-3  # not saturated: the smoothing shows
    x = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / 1.5) ** 2)
    kernel = torch.outer(k, k) / k.sum() ** 2
    padded = F.pad(raw[:, None], (3, 3, 3, 3), mode="replicate")
    torch.testing.assert_close(got, F.conv2d(padded, kernel[None, None])[:, 0])
    torch.testing.assert_close(unsmoothed, raw)
    assert (got - raw).abs().max() > 1e-3


@pytest.mark.parametrize("conditional", [False, True])
def test_training_step_targets_the_eval_segmenters_mistakes_with_bilinear_quarter_logits(
    conditional: bool,
) -> None:
    from training.train_flowenedet import FlowEneDetTraining

    torch.manual_seed(0)
    seg = TinySegmenter(num_classes=4, width=4, dropout=0.5)  # dropout: eval must be kept
    model = FlowEneDet(num_classes=4, blocks=2, hidden=6, dropout=0.0, conditional=conditional)
    _randomize(model, seed=1, std=0.3)
    module = FlowEneDetTraining(seg, model).train()
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (2, 3, 30, 46), dtype=torch.uint8, generator=gen)
    label = torch.randint(0, 4, (2, 30, 46), generator=gen)
    label[:, :6] = 255
    loss, logs = module({"image": image, "label": label})

    # Independently: the segmenter in eval mode; "wrong" = argmax of the logits resized
    # bilinearly to the label differs from it (void left out); the flow reads the logits
    # resized bilinearly to a quarter of the image, its output resized to the labels.
    seg.eval()
    with torch.no_grad():
        out = seg(seg.normalize(image))
        up = F.interpolate(out.logits, (30, 46), mode="bilinear", align_corners=False)
        target = (up.argmax(1) != label).long().masked_fill(label == 255, -100)
        assert out.logits.shape[-2:] == (8, 12)  # not a quarter of 30×46: resized
        quarter = F.interpolate(out.logits, (7, 11), mode="bilinear", align_corners=False)
        flow = model(quarter, out.features if conditional else None)
        flow = F.interpolate(flow, (30, 46), mode="bilinear", align_corners=False)
        want = F.cross_entropy(flow, target, ignore_index=-100)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    valid = target != -100
    assert logs["wrong_fraction"].item() == pytest.approx(target[valid].float().mean().item())
    assert 0.0 < logs["wrong_fraction"].item() < 1.0
