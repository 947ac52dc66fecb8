"""Our ESPNetv2 with the real Cityscapes checkpoints reproduces the upstream numbers.

Reference values are those measured with the upstream implementation and written down
in ../shared/real/README.md; ours must agree within 0.5 points.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import auc, average_precision_score, roc_curve

from segmentation_safety.models.espnetv2 import ESPNetv2Segmenter, infer_scale, load_espnetv2

pytestmark = pytest.mark.real

REAL = Path(
    os.environ.get(
        "SEGSAFE_REAL_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "real"
    )
)
NET_SIZE = (1024, 512)  # width × height, as the checkpoints were trained
TOLERANCE = 0.5  # points
CITY = "frankfurt/frankfurt_000000_000294"

# Upstream reference (README): pixel accuracy on the frame, and AP / AUROC / FPR95 on the
# 10 Road Anomaly images, all in percent.
PIXEL_ACCURACY = {"2.0": 94.0, "1.0": 83.8}
ROAD_ANOMALY = {
    "2.0": {
        "max_softmax": (20.90, 69.55, 68.36),
        "entropy": (21.89, 70.97, 67.82),
        "max_logit": (21.40, 74.91, 57.90),
        "energy": (19.87, 75.01, 57.50),
    },
    "1.0": {
        "max_softmax": (14.09, 62.21, 82.48),
        "max_logit": (14.03, 65.28, 75.17),
    },
}


def _weights(scale: str) -> Path:
    return REAL / "espnetv2" / f"espnetv2_s_{scale}_city_1024x512.pth"


@pytest.fixture(scope="module", autouse=True)
def _need_real_data():
    if not _weights("2.0").is_file():
        pytest.skip(f"real data absent: {REAL} (set SEGSAFE_REAL_DIR to the shared/real folder)")
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def models() -> dict[str, ESPNetv2Segmenter]:
    return {s: load_espnetv2(_weights(s)) for s in PIXEL_ACCURACY}


def _logits(model: ESPNetv2Segmenter, image: Image.Image) -> torch.Tensor:
    """Stride-2 logits (first 19 channels) of an RGB image resized to the training size."""
    x = torch.from_numpy(np.array(image.resize(NET_SIZE, Image.BILINEAR))).permute(2, 0, 1)
    with torch.no_grad():
        return model(model.normalize(x[None])).logits


def _scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Anomaly scores per pixel (higher = more anomalous) from C×H×W logits."""
    log_p = logits.log_softmax(0)
    return {
        "max_softmax": -log_p.exp().amax(0),
        "entropy": -(log_p.exp() * log_p).sum(0),
        "max_logit": -logits.amax(0),
        "energy": -torch.logsumexp(logits, 0),
    }


def _ap_auroc_fpr95(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float, float]:
    fpr, tpr, _ = roc_curve(labels, scores)
    # auc over the full ROC curve is what roc_auc_score computes; one sort instead of two.
    fpr95 = fpr[np.searchsorted(tpr, 0.95, side="left")]
    ap = average_precision_score(labels, scores)
    return 100 * ap, 100 * auc(fpr, tpr), 100 * fpr95


def test_checkpoints_load_strictly_with_inferred_scale(models):
    for scale, model in models.items():
        state = torch.load(_weights(scale), map_location="cpu", weights_only=True)
        assert infer_scale(state) == float(scale)
        assert set(model.net.state_dict()) == set(state)
        assert model.num_classes == 19 and model.embedding_channels["background"] == 1


@pytest.mark.parametrize("scale", sorted(PIXEL_ACCURACY))
def test_cityscapes_frame_pixel_accuracy(models, scale):
    image = Image.open(REAL / "cityscapes/leftImg8bit/val" / f"{CITY}_leftImg8bit.png")
    gt = np.asarray(Image.open(REAL / "cityscapes/gtFine/val" / f"{CITY}_gtFine_labelTrainIds.png"))
    logits = _logits(models[scale], image.convert("RGB"))
    logits = F.interpolate(logits, size=gt.shape, mode="bilinear", align_corners=False)
    pred = logits[0].argmax(0).numpy()
    valid = gt != 255
    accuracy = 100 * float((pred[valid] == gt[valid]).mean())
    assert abs(accuracy - PIXEL_ACCURACY[scale]) <= TOLERANCE, accuracy


@pytest.fixture(scope="module")
def road_anomaly() -> list[tuple[Image.Image, np.ndarray]]:
    frames = sorted((REAL / "roadanomaly" / "frames").glob("*.jpg"))
    assert len(frames) == 10
    out = []
    for f in frames:
        labels = np.asarray(Image.open(f.with_suffix(".labels") / "labels_semantic.png"))
        out.append((Image.open(f).convert("RGB"), labels == 2))
    return out


@pytest.mark.parametrize("scale", sorted(ROAD_ANOMALY))
def test_road_anomaly_softmax_family_metrics(models, road_anomaly, scale):
    expected = ROAD_ANOMALY[scale]
    pooled: dict[str, list[np.ndarray]] = {name: [] for name in expected}
    for image, anomalous in road_anomaly:
        logits = _logits(models[scale], image)
        logits = F.interpolate(logits, size=anomalous.shape, mode="bilinear", align_corners=False)
        scores = _scores(logits[0])
        for name in expected:
            pooled[name].append(scores[name].numpy().ravel())
    labels = np.concatenate([a.ravel() for _, a in road_anomaly])
    assert 0 < labels.mean() < 0.5
    for name, reference in expected.items():
        measured = _ap_auroc_fpr95(labels, np.concatenate(pooled[name]))
        for metric, got, want in zip(("AP", "AUROC", "FPR95"), measured, reference):
            assert abs(got - want) <= TOLERANCE, f"s={scale} {name} {metric}: {got:.2f} vs {want}"


def test_real_checkpoint_survives_a_bundle_round_trip(models, tmp_path):
    from segmentation_safety.checkpoint import load_bundle, save_bundle
    from segmentation_safety.models.zoo import segmenter_from_bundle, segmenter_metadata

    model = models["1.0"]
    path = tmp_path / "espnetv2_s1.safetensors"
    save_bundle(path, model.state_dict(), segmenter_metadata(model))
    rebuilt = segmenter_from_bundle(load_bundle(path, kind="segmenter"), str(path))
    x = model.normalize(torch.randint(0, 256, (1, 3, 64, 128), dtype=torch.uint8))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x).logits, model(x).logits)
