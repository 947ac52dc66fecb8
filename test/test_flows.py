"""Real-NVP flow and the flow-density detector (Fishyscapes §4.2, B.6)."""

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
from segmentation_safety.detectors.flow_density import (
    FlowDensityDetector,
    combine_scores,
    default_flow_layers,
    fit_logistic_combination,
)
from segmentation_safety.detectors.registry import build
from segmentation_safety.models.realnvp import FlowBatchNorm, RealNVP
from segmentation_safety.models.tiny import TinySegmenter

torch.set_num_threads(1)


def _randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Move every parameter and float buffer off its (identity) initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
        for name, b in module.named_buffers():
            if b.is_floating_point():
                if name.endswith("running_var"):
                    b.copy_(0.5 + torch.rand(b.shape, generator=gen, dtype=b.dtype))
                else:
                    b.add_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * std)


def _random_flow(channels: int = 4, steps: int = 3, seed: int = 0) -> RealNVP:
    flow = RealNVP(channels, steps=steps, hidden=8, seed=seed).double().eval()
    _randomize(flow, seed)
    return flow


def test_logdet_matches_autograd_jacobian() -> None:
    flow = _random_flow(channels=4)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, logdet = flow(x)
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[i])
        sign, expected = torch.linalg.slogdet(jac)
        assert sign.item() != 0
        assert logdet[i].item() == pytest.approx(expected.item(), abs=1e-8)
    # The flow must actually be non-volume-preserving here, or the test proves little.
    assert logdet.abs().max() > 0.1


def test_inverse_is_exact_on_vectors_and_maps() -> None:
    flow = _random_flow(channels=5, steps=4).float()
    x = torch.randn(7, 5)
    z, _ = flow(x)
    assert not torch.allclose(z, x, atol=1e-2)
    torch.testing.assert_close(flow.inverse(z), x, atol=1e-5, rtol=0)
    xmap = torch.randn(2, 5, 3, 4)
    zmap, logdet = flow(xmap)
    assert zmap.shape == xmap.shape and logdet.shape == (2, 3, 4)
    torch.testing.assert_close(flow.inverse(zmap), xmap, atol=1e-5, rtol=0)


def test_map_input_equals_per_vector_input() -> None:
    flow = _random_flow(channels=3)
    xmap = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    rows = xmap.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(flow.log_prob(xmap).reshape(-1), flow.log_prob(rows))


def test_identity_initialised_flow_is_standard_normal() -> None:
    flow = RealNVP(6, steps=8).eval()
    x = torch.randn(10, 6)
    z, _ = flow(x)
    # Only the fixed permutations act: z holds the same entries in another order.
    torch.testing.assert_close(z.sort(dim=1).values, x.sort(dim=1).values, atol=1e-3, rtol=1e-4)
    expected = multivariate_normal(mean=np.zeros(6), cov=np.eye(6)).logpdf(x.numpy())
    np.testing.assert_allclose(flow.log_prob(x).detach().numpy(), expected, atol=1e-3)


def test_density_of_a_non_trivial_flow_integrates_to_one() -> None:
    flow = _random_flow(channels=2, steps=3, seed=3)
    grid = torch.linspace(-12, 12, 481, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    with torch.no_grad():
        density = flow.log_prob(pts).exp()
    cell = (grid[1] - grid[0]) ** 2
    assert (density.sum() * cell).item() == pytest.approx(1.0, abs=1e-2)
    # Not a standard normal any more:
    std_normal = torch.exp(-0.5 * pts.pow(2).sum(1)) / (2 * math.pi)
    assert (density - std_normal).abs().max() > 1e-2


def test_batchnorm_normalises_in_training_and_tracks_running_stats() -> None:
    bn = FlowBatchNorm(3, momentum=0.5).train()
    x = torch.randn(400, 3) * torch.tensor([2.0, 0.5, 1.0]) + torch.tensor([1.0, -3.0, 0.0])
    y, logdet = bn(x.t())  # the flow's layers take C×N columns
    torch.testing.assert_close(y.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(1, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    var = x.var(0, unbiased=False)
    expected_logdet = -0.5 * torch.log(var + bn.eps).sum()
    torch.testing.assert_close(logdet, expected_logdet.expand(400))
    # running = 0.5·initial + 0.5·batch
    torch.testing.assert_close(bn.running_mean, 0.5 * x.mean(0))
    torch.testing.assert_close(bn.running_var, 0.5 + 0.5 * var)


def test_default_layers_follow_the_segmenter() -> None:
    seg = TinySegmenter(num_classes=4, width=4)
    assert default_flow_layers(seg) == ("enc3",)  # declared by the segmenter
    seg.default_flow_layers = ("enc2",)
    assert build("flow_density", seg).embeddings == ("enc2",)
    seg.default_flow_layers = ()
    assert default_flow_layers(seg) == ("dec",)  # nothing declared: the last tap


def _segmenter_and_output(layers: tuple[str, ...]) -> tuple[TinySegmenter, object]:
    torch.manual_seed(0)
    seg = TinySegmenter(num_classes=4, width=4).eval()
    with torch.no_grad():
        out = seg(torch.randn(2, 3, 32, 48), layers)
    return seg, out


def test_single_layer_anomaly_is_nll_minus_training_nll() -> None:
    seg, out = _segmenter_and_output(("enc3",))
    det = FlowDensityDetector(seg, layers=("enc3",), steps=2, hidden=8).eval()
    _randomize(det)
    det.train_nll.fill_(3.25)
    with torch.no_grad():
        result = det(out)
        nll = -det.flows["enc3"].log_prob(out.embeddings["enc3"])
    assert result.anomaly.shape == (2, 4, 6) and result.anomaly.dtype == torch.float32
    assert result.failure is None and result.class_iou is None
    torch.testing.assert_close(result.anomaly, nll - 3.25)


def test_training_nll_is_the_mean_over_every_pixel_of_every_image() -> None:
    # Eq. 8's L(Z_l): the mean NLL over all training pixels. Images of two sizes, so a
    # mean of per-image means (or of per-image sums) differs from it.
    from training.train_flow import mean_nll

    layers = ("enc2", "enc3")
    seg, _ = _segmenter_and_output(layers)
    det = FlowDensityDetector(seg, layers=layers, steps=2, hidden=8).eval()
    _randomize(det)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in ((32, 48, 3), (64, 96, 3))]
    data = [{"image": im, "label": np.zeros(im.shape[:2], np.uint8)} for im in images]
    with torch.no_grad():
        got = mean_nll(det, data, torch.device("cpu"), None)
        first = mean_nll(det, data, torch.device("cpu"), 1)
        maps = []
        for im in images:
            x = torch.from_numpy(im).permute(2, 0, 1)[None]
            out = seg(seg.normalize(x), layers)
            maps.append([-det.flows[n].log_prob(out.embeddings[n]).flatten() for n in layers])
    for j in range(len(layers)):
        pooled = torch.cat([m[j] for m in maps]).double().mean()
        per_image = torch.stack([m[j].double().mean() for m in maps]).mean()
        assert abs(pooled - per_image) > 1e-3  # the sizes make the two means differ
        assert got[j].item() == pytest.approx(pooled.item(), rel=1e-5)
        assert first[j].item() == pytest.approx(maps[0][j].double().mean().item(), rel=1e-5)


def test_combine_scores_by_hand() -> None:
    scores = torch.tensor([[1.0, 5.0], [3.0, 2.0]]).view(2, 1, 1, 2)
    assert combine_scores(scores, "min", torch.zeros(2), torch.zeros(())).flatten().tolist() == [
        1.0,
        2.0,
    ]
    logreg = combine_scores(scores, "logreg", torch.tensor([2.0, -1.0]), torch.tensor(0.5))
    torch.testing.assert_close(logreg.flatten(), torch.tensor([-0.5, 8.5]))
    with pytest.raises(ValueError):
        combine_scores(scores, "max", torch.zeros(2), torch.zeros(()))


@pytest.mark.parametrize("combine", ["min", "logreg"])
def test_two_layers_are_upsampled_and_combined(combine: str) -> None:
    layers = ("enc2", "enc3")
    seg, out = _segmenter_and_output(layers)
    det = build("flow_density", seg, layers=layers, combine=combine, steps=2, hidden=8).eval()
    _randomize(det)
    det.train_nll.copy_(torch.tensor([10.0, -4.0]))
    det.logreg_weight.copy_(torch.tensor([0.7, -1.3]))
    det.logreg_bias.fill_(0.2)
    with torch.no_grad():
        anomaly = det(out).anomaly
        s2 = -det.flows["enc2"].log_prob(out.embeddings["enc2"]) - 10.0
        s3 = -det.flows["enc3"].log_prob(out.embeddings["enc3"]) + 4.0
    s3_up = F.interpolate(s3[:, None], size=s2.shape[-2:], mode="bilinear", align_corners=False)
    s3_up = s3_up[:, 0]
    assert anomaly.shape == s2.shape == (2, 8, 12)
    expected = torch.minimum(s2, s3_up) if combine == "min" else 0.7 * s2 - 1.3 * s3_up + 0.2
    torch.testing.assert_close(anomaly, expected)


def test_bad_options_are_refused() -> None:
    seg = TinySegmenter(num_classes=4, width=4)
    with pytest.raises(ValueError, match="unknown layers"):
        FlowDensityDetector(seg, layers=("nope",))
    with pytest.raises(ValueError, match="combine"):
        FlowDensityDetector(seg, combine="mean")


def test_fit_logistic_combination_on_separable_data() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 200
    labels = torch.cat([torch.zeros(n), torch.ones(n)]).long()
    informative = torch.cat([torch.rand(n, generator=gen), 2.0 + torch.rand(n, generator=gen)])
    noise = torch.randn(2 * n, generator=gen)
    # Void pixels with misleading scores must be ignored.
    labels = torch.cat([labels, torch.full((50,), 255)])
    informative = torch.cat([informative, torch.full((50,), 10.0)])
    noise = torch.cat([noise, torch.zeros(50)])
    w, b = fit_logistic_combination([informative, noise], labels)
    assert w.shape == (2,) and b.shape == ()
    logit = w[0] * informative[: 2 * n] + w[1] * noise[: 2 * n] + b
    assert torch.equal(logit > 0, labels[: 2 * n] == 1)
    assert w[0] > 0 and w[0].abs() > 5 * w[1].abs()
    # The same fit from an N×L matrix.
    w2, b2 = fit_logistic_combination(torch.stack([informative, noise], 1), labels)
    torch.testing.assert_close(w2, w, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="both"):
        fit_logistic_combination([informative[:n]], torch.zeros(n))


def test_bundle_round_trip(tmp_path) -> None:
    layers = ("enc2", "enc3")
    seg, out = _segmenter_and_output(layers)
    det = FlowDensityDetector(seg, layers=layers, combine="logreg", steps=2, hidden=8).eval()
    _randomize(det, seed=5)
    path = tmp_path / "flow.safetensors"
    save_bundle(path, det.state_dict(), {"kind": "flow", "architecture": det.architecture})
    bundle = load_bundle(path, kind="flow")
    arch = bundle.metadata["architecture"]
    again = FlowDensityDetector(seg, **{**arch, "layers": tuple(arch["layers"])}).eval()
    load_state_strict(again, bundle, path)
    with torch.no_grad():
        torch.testing.assert_close(again(out).anomaly, det(out).anomaly)


@pytest.mark.parametrize(
    "options",
    [
        {"layers": ("enc2", "enc3"), "combine": "logreg", "steps": 2, "hidden": 8, "seed": 3},
        {"layers": ("dec",), "combine": "min", "steps": 1, "hidden": 4, "seed": 1},
    ],
)
def test_export_load_part_rebuilds_the_trained_architecture(tmp_path, options) -> None:
    seg, out = _segmenter_and_output(("enc1", "enc2", "enc3", "dec"))
    det = FlowDensityDetector(seg, **options).eval()
    _randomize(det, seed=5)  # flows, train_nll and the logistic weights all move
    path = tmp_path / "flow.safetensors"
    tensors, meta = det.export_part("flow")
    assert meta["kind"] == "flow" and meta["architecture"]["hidden"] == options["hidden"]
    save_bundle(path, tensors, meta)
    fresh = FlowDensityDetector(seg).eval()  # defaults: enc3, 8 steps, hidden 32
    fresh.load_part("flow", load_bundle(path), path)
    assert fresh.architecture == det.architecture and fresh.embeddings == options["layers"]
    assert not fresh.training
    with torch.no_grad():
        torch.testing.assert_close(fresh(out).anomaly, det(out).anomaly, rtol=0, atol=0)


def test_load_part_refusals_name_the_file(tmp_path) -> None:
    seg = TinySegmenter(num_classes=4, width=4)
    det = FlowDensityDetector(seg, layers=("enc2",), steps=1, hidden=4)
    tensors, meta = det.export_part("flow")
    path = str(tmp_path / "flow.safetensors")
    arch = meta["architecture"]
    bad = {
        "kind": {**meta, "kind": "sml"},
        "no architecture": {k: v for k, v in meta.items() if k != "architecture"},
        "lacks": {**meta, "architecture": {k: v for k, v in arch.items() if k != "steps"}},
        "classes": {**meta, "num_classes": 19},
        "layers": {**meta, "architecture": {**arch, "layers": ["nope"]}},
    }
    for why, metadata in bad.items():
        with pytest.raises(BundleError, match="flow.safetensors") as err:
            det.load_part("flow", Bundle(tensors, metadata), path)
        assert err.value.path == path, why
    wider = FlowDensityDetector(TinySegmenter(num_classes=4, width=8), layers=("enc2",))
    with pytest.raises(BundleError, match="trained on segmenter sha256:.*not on the segmenter"):
        wider.load_part("flow", Bundle(tensors, meta), path)
    # A bundle from before fingerprints still meets the shape checks (with a warning).
    legacy = {k: v for k, v in meta.items() if k != "segmenter"}
    with pytest.warns(UserWarning, match="no segmenter fingerprint"):
        with pytest.raises(BundleError, match="channels"):
            wider.load_part("flow", Bundle(tensors, legacy), path)
    with pytest.raises(BundleError, match="do not match"):  # weights of another architecture
        det.load_part(
            "flow", Bundle(tensors, {**meta, "architecture": {**arch, "hidden": 8}}), path
        )
    with pytest.raises(KeyError):
        det.load_part("flowenedet", Bundle(tensors, meta), path)
