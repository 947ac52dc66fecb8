"""`segsafe evaluate`: the evaluation loop, the report files and the command's refusals."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from segmentation_safety.checkpoint import save_bundle
from segmentation_safety.detectors import Detector, registry
from segmentation_safety.metrics import FailureMetrics
from segmentation_safety.metrics.iou_prediction import IoUPredictionResult
from segmentation_safety.metrics.pixel import AnomalyResult
from segmentation_safety.models.zoo import build_segmenter, segmenter_metadata
from segmentation_safety.pipeline import Pipeline, PipelineConfig
from segmentation_safety.types import DetectorOutput, SegmenterOutput
from training import evaluate_cli
from training.evaluate import (
    DetectorScores,
    EvaluationReport,
    check_sample,
    closed_set_label,
    evaluate,
)
from training.report import report_json, write_report

H, W = 32, 64
ROAD, SKY, CAR = 0, 10, 13
DESIGN_BLOCKS = {
    "anomaly": {"ap", "fpr95", "auroc"},
    "failure": {"aupr_error", "aupr_success", "auroc", "fpr95"},
    "iou": {"mae", "pearson", "spearman"},
}
# Parts in the bundle win anyway; the tiny preset only avoids building the paper-size ones.
TINY_RESYNTHESIS = json.dumps(
    {n: {"preset": "tiny"} for n in ("resynthesis", "resynthesis_anomaly")}
)
BLOCK_OF = {"anomaly": "anomaly", "failure": "failure", "class_iou": "iou"}


def _scene(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A street-ish image, its train ids and a 0/1/255 anomaly map with a red box on the road."""
    rng = np.random.default_rng(i)
    image = np.zeros((H, W, 3), np.uint8)
    image[: H // 2] = (70, 130, 180)
    image[H // 2 :] = (128, 64, 128)
    label = np.full((H, W), ROAD, np.uint8)
    label[: H // 2] = SKY
    x = 4 + 8 * i
    label[H // 2 : H // 2 + 6, x + 20 : x + 30] = CAR
    image[H // 2 : H // 2 + 6, x + 20 : x + 30] = (0, 0, 142)
    anomaly = np.zeros((H, W), np.uint8)
    anomaly[H - 10 : H - 4, x : x + 8] = 1
    image[anomaly == 1] = (255, 0, 0)
    anomaly[-2:] = 255  # the "hood"
    label[-2:] = 255
    semantic = label.copy()
    semantic[anomaly == 1] = 255
    image = np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)
    return image, semantic, anomaly


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"))


def write_world(root: Path) -> Path:
    """A three-image world in the layout `segsafe world` writes (val and anomaly splits)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "world.json").write_text("{}")
    for i in range(3):
        image, semantic, anomaly = _scene(i)
        stem = f"voxelstadt_{i:06d}_000019"
        _png(root / "leftImg8bit/val/voxelstadt" / f"{stem}_leftImg8bit.png", image)
        _png(root / "gtFine/val/voxelstadt" / f"{stem}_gtFine_labelTrainIds.png", semantic)
        name = f"anomaly_{i:06d}.png"
        _png(root / "anomaly/images" / name, image)
        _png(root / "anomaly/labels" / name, anomaly)
        _png(root / "anomaly/semantic" / name, semantic)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny segmenter bundle plus trained parts of sml, densehybrid, resynthesis."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    seg = build_segmenter("tiny", num_classes=19, width=8)
    with torch.no_grad():  # mostly "road": right on the road, wrong elsewhere
        seg.classifier.bias[ROAD] += 3.0
    save_bundle(root / "segmenter.safetensors", seg.state_dict(), segmenter_metadata(seg))
    for name, opts in (("sml", {}), ("densehybrid", {}), ("resynthesis", {"preset": "tiny"})):
        det = registry.build(name, seg, **opts)
        for kind in det.trained_parts:
            tensors, meta = det.export_part(kind)
            save_bundle(root / f"{kind}.safetensors", tensors, meta)
    return root


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    evaluate_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["evaluate", *argv])
    return args.run(args)


def _check_blocks(report: dict) -> None:
    for name, blocks in report["detectors"].items():
        produces = registry.detector_class(name).produces
        assert set(blocks) <= {BLOCK_OF[k] for k in produces}, name
        for block, values in blocks.items():
            assert set(values) == DESIGN_BLOCKS[block], (name, block)
            for key, v in values.items():
                low = -1.0 if key in ("pearson", "spearman") else 0.0
                assert v is None or low <= v <= 1.0, (name, block, key, v)


def test_end_to_end_anomaly_split_writes_design_report(world: Path, models: Path, tmp_path: Path):
    out = tmp_path / "eval" / "R.json"
    rc = _cli(
        "--root", str(world), "--split", "anomaly", "--models", str(models),
        "--out", str(out), "--device", "cpu", "--metrics", "exact", "--quiet",
        "--batch-size", "2", "--detector-options", TINY_RESYNTHESIS,
        "--detectors", "all",
    )  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report) == {
        "dataset", "images", "segmentation", "detectors", "skipped", "score_at", "input_resize",
        "anomaly_rule",
    }  # fmt: skip
    assert report["input_resize"] == "pil"  # PIL's pixels unless asked otherwise
    assert report["anomaly_rule"] == "pooled"  # Fishyscapes' rule for the world
    assert report["dataset"] == "world" and report["images"] == 3
    assert report["score_at"]["requested"] == "network"  # the default: what the node publishes
    assert set(report["score_at"]["detectors"].values()) == {"network"}
    assert set(report["segmentation"]) == {"miou"}
    assert 0.0 <= report["segmentation"]["miou"] <= 1.0
    _check_blocks(report)
    dets = report["detectors"]
    assert set(dets["max_softmax"]) == {"anomaly", "failure"}
    assert set(dets["sml"]) == {"anomaly"} and set(dets["densehybrid"]) == {"anomaly"}
    assert set(dets["resynthesis"]) == {"anomaly", "failure", "iou"}
    assert all(v is not None for v in dets["max_softmax"]["anomaly"].values())
    # Parts absent from --models: skipped with the file named, not fatal under "all".
    assert "flow_density" in report["skipped"] and "flow.safetensors" in str(report["skipped"])
    assert (out.parent / "R.md").read_text().startswith("# Evaluation on world/anomaly")
    for png in ("R_anomaly.png", "R_failure.png"):
        assert (out.parent / png).read_bytes()[:4] == b"\x89PNG"


def test_val_split_without_anomaly_labels_has_no_anomaly_blocks(
    world: Path, models: Path, tmp_path: Path
):
    out = tmp_path / "R.json"
    rc = _cli(
        "--root", str(world), "--split", "val", "--models", str(models), "--out", str(out),
        "--detectors", "max_softmax,entropy", "--metrics", "exact", "--quiet", "--limit", "2",
    )  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["images"] == 2
    assert set(report["detectors"]) == {"max_softmax"}
    assert set(report["detectors"]["max_softmax"]) == {"failure"}
    assert "entropy" in report["skipped"]  # anomaly-only detector, nothing to score on val
    _check_blocks(report)


def test_input_resize_flag_reaches_the_pipeline_and_the_report(
    world: Path, models: Path, tmp_path: Path
):
    common = (
        "--root", str(world), "--split", "anomaly", "--models", str(models), "--quiet",
        "--detectors", "max_softmax", "--metrics", "exact", "--input-size", "37", "61",
    )  # fmt: skip
    reports = {}
    for method in ("pil", "fast"):
        out = tmp_path / method / "R.json"
        assert _cli(*common, "--input-resize", method, "--out", str(out)) == 0
        reports[method] = json.loads(out.read_text())
        assert reports[method]["input_resize"] == method
        assert f"input resize: {method}" in (out.parent / "R.md").read_text()
    # The network saw other pixels, so the scores moved (a little).
    pil, fast = (reports[m]["detectors"]["max_softmax"]["anomaly"] for m in ("pil", "fast"))
    assert pil != fast and abs(pil["auroc"] - fast["auroc"]) < 0.05


class _RedOracle(Detector):
    """Anomaly = the red channel of the network input: perfect on the red-box scenes."""

    name: ClassVar[str] = "test_red_oracle"
    produces: ClassVar[frozenset[str]] = frozenset({"anomaly"})

    def forward(self, out: SegmenterOutput) -> DetectorOutput:
        red = out.image[:, 0] - out.image[:, 1] - out.image[:, 2]
        return DetectorOutput(anomaly=(red > red.amax() * 0.5).float())


def test_perfect_detector_scores_ap_one_fpr95_zero():
    seg = build_segmenter("tiny", num_classes=19, width=8)
    pipeline = Pipeline(
        seg, {"oracle": _RedOracle(seg)}, PipelineConfig(anomaly=None, device="cpu")
    )
    samples = []
    for i in range(3):
        image, _, anomaly = _scene(i)
        image[anomaly != 1] = np.minimum(image[anomaly != 1], 140)  # no other strong red
        samples.append({"image": image, "anomaly": anomaly})
    report = evaluate(pipeline, samples, dataset="oracle", metrics_mode="exact", progress=False)
    result = report.detectors["oracle"].anomaly
    assert result.ap == pytest.approx(1.0)
    assert result.fpr95 == pytest.approx(0.0)
    assert result.auroc == pytest.approx(1.0)
    assert report.miou is None and report_json(report)["segmentation"] == {"miou": None}


class _NonFiniteOracle(_RedOracle):
    """The red oracle's map at the network's resolution, a few pixels overflowed."""

    name: ClassVar[str] = "test_non_finite_oracle"

    def forward(self, out: SegmenterOutput) -> DetectorOutput:
        score = super().forward(out).anomaly
        score = nn.functional.avg_pool2d(score[:, None], 4)[:, 0]  # coarser than the labels
        score[:, 0, 0] = -math.inf  # a corner: bilinear gives its neighbours weight 0
        score[:, -1, -1] = math.inf
        score[:, 0, -1] = math.nan
        return DetectorOutput(anomaly=score)


def test_non_finite_scores_rank_at_the_ends_instead_of_stopping_the_evaluation():
    # Upsampling spreads 0 * inf = NaN over the border; the metrics refuse NaN. NaN and
    # +inf rank as the most anomalous (as the node counts NaN), -inf as the least.
    seg = build_segmenter("tiny", num_classes=19, width=8)
    pipeline = Pipeline(
        seg, {"oracle": _NonFiniteOracle(seg)}, PipelineConfig(anomaly=None, device="cpu")
    )
    samples = [{"image": _scene(i)[0], "anomaly": _scene(i)[2]} for i in range(2)]
    report = evaluate(pipeline, samples, dataset="oracle", metrics_mode="exact", progress=False)
    result = report.detectors["oracle"].anomaly
    assert 0.0 < result.ap <= 1.0 and 0.0 <= result.fpr95 <= 1.0


class _FullResNonFiniteOracle(_RedOracle):
    """The red oracle's 0/1 map at the image size, with an anomaly pixel NaN, another +inf
    and an inlier -inf (no resizing, so nothing spreads: only their ranks matter)."""

    name: ClassVar[str] = "test_full_res_non_finite_oracle"

    def forward(self, out: SegmenterOutput) -> DetectorOutput:
        score = super().forward(out).anomaly.clone()
        assert score.shape[-2:] == (H, W)
        score[:, H - 10, 4] = math.nan  # anomaly pixels of _scene(0)
        score[:, H - 9, 5] = math.inf
        score[:, 2, 2] = -math.inf  # sky
        return DetectorOutput(anomaly=score)


def test_nan_and_inf_rank_as_most_anomalous_and_minus_inf_as_least():
    seg = build_segmenter("tiny", num_classes=19, width=8)
    pipeline = Pipeline(
        seg, {"oracle": _FullResNonFiniteOracle(seg)}, PipelineConfig(anomaly=None, device="cpu")
    )
    image, _, anomaly = _scene(0)
    image[anomaly != 1] = np.minimum(image[anomaly != 1], 140)  # no other strong red
    assert anomaly[H - 10, 4] == 1 and anomaly[H - 9, 5] == 1 and anomaly[2, 2] == 0
    report = evaluate(
        pipeline, [{"image": image, "anomaly": anomaly}], metrics_mode="exact", progress=False
    )
    # Every anomaly pixel (1, NaN or +inf) outranks every inlier (0 or -inf): a perfect
    # ranking. NaN taken as the least anomalous, or -inf as the most, would break it.
    result = report.detectors["oracle"].anomaly
    assert result.ap == pytest.approx(1.0)
    assert result.auroc == pytest.approx(1.0)
    assert result.fpr95 == pytest.approx(0.0)


class _NonFiniteFailure(_RedOracle):
    """A failure map at the network's resolution, NaN and +inf in two corners, -inf in one."""

    name: ClassVar[str] = "test_non_finite_failure"
    produces: ClassVar[frozenset[str]] = frozenset({"failure"})

    def forward(self, out: SegmenterOutput) -> DetectorOutput:
        score = nn.functional.avg_pool2d(super().forward(out).anomaly[:, None], 4)[:, 0]
        score[:, 0, 0] = math.nan
        score[:, 0, -1] = math.inf
        score[:, -1, 0] = -math.inf
        return DetectorOutput(failure=score)


def test_non_finite_failure_scores_rank_at_the_ends_too(monkeypatch):
    maps = []
    real_update = FailureMetrics.update
    monkeypatch.setattr(
        FailureMetrics, "update", lambda self, s, *a: maps.append(s) or real_update(self, s, *a)
    )
    seg = build_segmenter("tiny", num_classes=19, width=8)
    pipeline = Pipeline(
        seg, {"oracle": _NonFiniteFailure(seg)}, PipelineConfig(anomaly=None, device="cpu")
    )
    image, label, _ = _scene(0)
    report = evaluate(pipeline, [{"image": image, "label": label}], progress=False)
    (scored,) = maps
    assert scored.shape == (H, W) and np.isfinite(scored).all()
    # The corners keep their rank: NaN and +inf above every real score, -inf below.
    assert scored[0, 0] > 1e29 and scored[0, -1] > 1e29 and scored[-1, 0] < -1e29
    assert np.abs(scored[8:-8, 8:-8]).max() <= 1.0  # away from the corners: the map itself
    assert report.detectors["oracle"].failure.num_error > 0


def test_registered_fake_detector_runs_through_the_command(
    world: Path, models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(registry._REGISTRY, _RedOracle.name, _RedOracle)
    out = tmp_path / "R.json"
    rc = _cli(
        "--root", str(world), "--split", "anomaly", "--models", str(models), "--out", str(out),
        "--detectors", _RedOracle.name, "--metrics", "exact", "--quiet",
    )  # fmt: skip
    assert rc == 0
    block = json.loads(out.read_text())["detectors"][_RedOracle.name]["anomaly"]
    assert block["ap"] == pytest.approx(1.0) and block["fpr95"] == pytest.approx(0.0)


def test_unknown_detector_is_refused_with_the_known_list(world: Path, tmp_path: Path, capsys):
    rc = _cli("--root", str(world), "--split", "val", "--detectors", "nope", "--out",
              str(tmp_path / "R.json"))  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown detector 'nope'" in err and "max_softmax" in err and "densehybrid" in err
    assert not (tmp_path / "R.json").exists()


def test_named_detector_with_missing_part_names_the_file(
    world: Path, models: Path, tmp_path: Path, capsys
):
    rc = _cli("--root", str(world), "--split", "anomaly", "--models", str(models),
              "--detectors", "sml,flow_density", "--out", str(tmp_path / "R.json"))  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert str(models / "flow.safetensors") in err and "flow_density" in err


def test_split_a_dataset_lacks_is_refused(world: Path, tmp_path: Path, capsys):
    rc = _cli("--root", str(world), "--dataset", "roadanomaly", "--split", "val",
              "--out", str(tmp_path / "R.json"))  # fmt: skip
    assert rc == 2
    assert "--split anomaly" in capsys.readouterr().err


def test_bad_counts_and_an_out_it_cannot_write_are_refused_first(world: Path, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    out = str(tmp_path / "R.json")
    cases = [
        (("--batch-size", "0", "--out", out), "--batch-size must be at least 1"),
        (("--out", str(tmp_path / "afile" / "R.json")), "is a file, not a directory"),
    ]
    for extra, words in cases:
        assert _cli("--root", str(world), "--split", "anomaly", *extra) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err


def test_bad_samples_are_refused_by_name():
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="frame7.*neither"):
        check_sample({"image": image, "name": "frame7"})
    with pytest.raises(ValueError, match="uint8"):
        check_sample({"image": image.astype(np.float32), "anomaly": np.zeros((4, 4))})
    with pytest.raises(ValueError, match="differ in size"):
        check_sample({"image": image, "label": np.zeros((4, 4)), "anomaly": np.zeros((2, 4))})


def test_anomaly_class_beyond_k_is_void_for_closed_set_scores():
    # StreetHazards labels anomalies as class K; closed-set metrics skip them.
    label = np.array([[0, 12], [11, 255]], np.uint8)
    anomaly = np.array([[0, 1], [0, 255]], np.uint8)
    np.testing.assert_array_equal(closed_set_label(label, anomaly, 12), [[0, 255], [11, 255]])


def test_streethazards_is_scored_by_its_benchmarks_per_image_rule(tmp_path: Path):
    from segmentation_safety.metrics import AnomalyMetrics, PerImageAnomalyMetrics

    seg = build_segmenter("tiny", num_classes=19, width=8)
    pipeline = Pipeline(seg, {"max_softmax": registry.build("max_softmax", seg)},
                        PipelineConfig(anomaly=None, device="cpu"))  # fmt: skip
    samples = [{"image": _scene(i)[0], "anomaly": _scene(i)[2]} for i in range(3)]
    samples.append({"image": _scene(3)[0], "anomaly": np.zeros((H, W), np.uint8)})
    # The same maps, scored both ways by hand.
    pooled, per_image = AnomalyMetrics(mode="exact"), PerImageAnomalyMetrics()
    maps = Pipeline(seg, pipeline.detectors, PipelineConfig(anomaly="max_softmax", device="cpu"))
    for sample in samples:
        score = maps.process(sample["image"], ["anomaly"])
        pooled.update(score.anomaly, sample["anomaly"])
        per_image.update(score.anomaly, sample["anomaly"])
    report = evaluate(
        pipeline, samples, dataset="streethazards", metrics_mode="exact", progress=False
    )
    assert report.anomaly_rule == "per_image"
    write_report(report, tmp_path / "R.json")
    data = json.loads((tmp_path / "R.json").read_text())
    blocks = data["detectors"]["max_softmax"]
    assert data["anomaly_rule"] == "per_image"
    for key, want in per_image.compute().as_dict().items():
        assert blocks["anomaly"][key] == pytest.approx(want, abs=1e-9), key
    for key, want in pooled.compute().as_dict().items():
        assert blocks["anomaly_pooled"][key] == pytest.approx(want, abs=1e-9), key
    assert per_image.compute().skipped == 1  # the image without an anomaly
    md = (tmp_path / "R.md").read_text()
    assert "each image's values averaged" in md and "(pixel level, pooled)" in md
    # Any other dataset pools, and has no second block.
    other = evaluate(pipeline, samples, dataset="roadanomaly", metrics_mode="exact", progress=False)
    assert other.anomaly_rule == "pooled"
    assert report_json(other)["detectors"]["max_softmax"].keys() == {"anomaly"}


def _streethazards(root: Path, frames: int = 2) -> Path:
    """A StreetHazards test split in its release layout: road (8), building (2), and
    a box of the anomaly class (14) in each annotation."""
    for i in range(frames):
        image, _, _ = _scene(i)
        raw = np.full((H, W), 8, np.uint8)
        raw[: H // 2] = 2
        raw[H - 10 : H - 4, 4 + 8 * i : 12 + 8 * i] = 14
        _png(root / "test" / "images" / "test" / "t5" / f"{i:03d}.png", image)
        _png(root / "test" / "annotations" / "test" / "t5" / f"{i:03d}.png", raw)
    return root


def test_a_segmenter_of_other_classes_is_scored_on_anomalies_only(
    models: Path, tmp_path: Path, capsys
):
    # The 19 Cityscapes classes on StreetHazards' 12: ids 0..11 fit, so without the
    # check a confident, meaningless mIoU came out.
    out = tmp_path / "R.json"
    rc = _cli(
        "--dataset", "streethazards", "--root", str(_streethazards(tmp_path / "sh")),
        "--split", "anomaly", "--models", str(models), "--detectors", "max_softmax",
        "--out", str(out), "--device", "cpu", "--metrics", "exact", "--quiet",
    )  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "19 classes (road, sidewalk, building, ...) are not streethazards's 12" in err
    report = json.loads(out.read_text())
    assert report["segmentation"] == {"miou": None} and report["images"] == 2
    assert report["anomaly_rule"] == "per_image"
    assert set(report["detectors"]["max_softmax"]) == {"anomaly", "anomaly_pooled"}


def test_label_sets_are_compared_by_name_or_by_count_where_unnamed():
    from segmentation_safety.labels import TRAIN_NAMES

    assert evaluate_cli.label_set_problem("cityscapes", list(TRAIN_NAMES)) is None
    assert evaluate_cli.label_set_problem("streethazards", [str(i) for i in range(12)]) is None
    assert "13 classes" in evaluate_cli.label_set_problem("streethazards", list("abcdefghijklm"))
    assert evaluate_cli.label_set_problem("roadanomaly", ["x"]) is None  # no labels to match
    labels_only = [{"image": None, "label": np.zeros((2, 2), np.uint8), "anomaly": None}]
    with pytest.raises(evaluate_cli.InvalidArgumentError, match="nothing to score"):
        list(evaluate_cli.without_labels(labels_only, "cityscapes", "val"))


def test_report_writes_null_for_undefined_metrics(tmp_path: Path):
    seg = build_segmenter("tiny", num_classes=19, width=8)
    pipeline = Pipeline(seg, {"max_softmax": registry.build("max_softmax", seg)},
                        PipelineConfig(anomaly=None, device="cpu"))  # fmt: skip
    image, _, _ = _scene(0)
    samples = [{"image": image, "anomaly": np.zeros((H, W), np.uint8)}]  # no anomaly pixel
    report = evaluate(pipeline, samples, dataset="empty", metrics_mode="exact", progress=False)
    written = write_report(report, tmp_path / "R.json")
    data = json.loads((tmp_path / "R.json").read_text())  # strict JSON: no NaN
    assert data["detectors"]["max_softmax"]["anomaly"]["ap"] is None
    assert tmp_path / "R.md" in written


def test_report_files_agree_and_only_measured_blocks_get_a_plot(tmp_path: Path):
    curve = np.array([0.0, 0.5, 1.0])
    anomaly = AnomalyResult(
        ap=0.5, auroc=0.75, fpr95=0.25, threshold95=0.1, num_anomaly=2, num_inlier=6,
        recall=curve, precision=curve, fpr=curve, tpr=curve,
    )  # fmt: skip
    nan = np.full(3, np.nan)
    iou = IoUPredictionResult(
        mae=0.125, std=0.0, pearson=-0.5, spearman=-0.25, pooled_mae=0.125, pooled_std=0.0,
        pooled_pearson=-0.5, pooled_spearman=-0.25, num_pairs=4,
        per_class_mae=nan, per_class_std=nan, per_class_pearson=nan, per_class_spearman=nan,
    )  # fmt: skip
    report = EvaluationReport(
        dataset="d", split="s", images=4, miou=None, pixel_accuracy=None, class_iou=None,
        class_names=[], detectors={"a": DetectorScores(anomaly=anomaly),
                                   "b": DetectorScores(iou=iou)},
        scored_at={"a": "network", "b": "network"},
    )  # fmt: skip
    written = write_report(report, tmp_path / "R.json")
    # No failure block anywhere: no failure plot (an empty figure would be noise).
    assert written == [tmp_path / "R.json", tmp_path / "R.md", tmp_path / "R_anomaly.png"]
    assert not (tmp_path / "R_failure.png").exists()
    data = json.loads((tmp_path / "R.json").read_text())
    assert data["detectors"] == {
        "a": {"anomaly": {"ap": 0.5, "fpr95": 0.25, "auroc": 0.75}},
        # Correlations range over [-1, 1]: a negative one is kept, not clipped to 0.
        "b": {"iou": {"mae": 0.125, "pearson": -0.5, "spearman": -0.25}},
    }
    md = (tmp_path / "R.md").read_text().splitlines()
    # The same values: percent for fractions, coefficients for correlations.
    assert "| a | 50.00 | 75.00 | 25.00 |" in md  # AP, AUROC, FPR95
    assert "| b | 12.50 | -0.500 | -0.250 |" in md  # MAE, Pearson, Spearman
    assert not any(line.startswith("## Failure") for line in md)


@pytest.mark.real
def test_real_espnetv2_on_road_anomaly(real_data: Path, tmp_path: Path, capsys):
    real = real_data / "espnetv2" / "espnetv2_s_1.0_city_1024x512.pth"
    root = real_data / "roadanomaly"
    if not real.is_file() or not root.is_dir():
        pytest.skip(f"needs {real} and {root}")
    # Renamed, the file no longer says its size: evaluate says what it assumed, as
    # import-weights does.
    weights = tmp_path / "espnet.pth"
    weights.write_bytes(real.read_bytes())
    out = tmp_path / "R.json"
    rc = _cli(
        "--dataset", "roadanomaly", "--root", str(root), "--split", "anomaly",
        "--segmenter-weights", str(weights), "--detectors", "max_logit", "--limit", "1",
        "--out", str(out), "--quiet", "--device", "cpu",
    )  # fmt: skip
    assert rc == 0
    assert "note: espnet.pth: input 512x1024 (H x W) assumed" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["images"] == 1 and report["segmentation"] == {"miou": None}
    assert 0.0 < report["detectors"]["max_logit"]["anomaly"]["ap"] < 1.0


def test_open_miou_counts_flagged_pixels_as_the_anomaly_class():
    from training.evaluate import MetricAccumulators

    label = np.array([[0, 1], [2, 0]], np.uint8)
    anomaly = np.array([[0, 0], [0, 1]], np.uint8)  # an object lying on the road
    logits = torch.nn.functional.one_hot(torch.from_numpy(label).long(), 3).permute(2, 0, 1)
    produces = {"exact": frozenset({"anomaly"}), "blind": frozenset({"anomaly"})}
    acc = MetricAccumulators(3, produces, "exact", {"exact": 0.5, "blind": 0.5})
    outputs = {
        "exact": DetectorOutput(anomaly=torch.from_numpy(anomaly).float()),
        "blind": DetectorOutput(anomaly=torch.zeros(2, 2)),
    }
    acc.update(logits.float(), outputs, label, anomaly)
    scores = acc.scores()
    assert scores["exact"].open_set == {"open_miou": pytest.approx(1.0)}
    # Unflagged, the object is taken for road: road's open IoU is 1/2 (DenseHybrid eq. 16).
    assert scores["blind"].open_set["open_miou"] == pytest.approx((0.5 + 1 + 1) / 3)
    no_threshold = MetricAccumulators(3, produces, "exact")
    no_threshold.update(logits.float(), outputs, label, anomaly)
    assert no_threshold.scores()["exact"].open_set is None


def test_end_to_end_densehybrid_with_an_open_set_threshold_reports_open_miou(
    world: Path, models: Path, tmp_path: Path
):
    from segmentation_safety.checkpoint import load_bundle

    bundle = load_bundle(models / "densehybrid.safetensors")
    meta = {k: v for k, v in bundle.metadata.items() if k != "format"}
    open_models = tmp_path / "models"
    for f in models.glob("*.safetensors"):
        (open_models / f.name).parent.mkdir(exist_ok=True)
        (open_models / f.name).write_bytes(f.read_bytes())
    save_bundle(open_models / "densehybrid.safetensors", bundle.tensors,
                {**meta, "thresholds": {"open_set": 0.0}})  # fmt: skip
    out = tmp_path / "R.json"
    rc = _cli(
        "--root", str(world), "--split", "anomaly", "--models", str(open_models),
        "--detectors", "densehybrid,max_softmax", "--out", str(out), "--quiet",
    )  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    assert 0.0 <= report["detectors"]["densehybrid"]["open_set"]["open_miou"] <= 1.0
    assert "open_set" not in report["detectors"]["max_softmax"]
    assert "open-mIoU" in (tmp_path / "R.md").read_text()


# -- order of resizing and scoring (--score-at) ----------------------------------------------
class _RecordingAnomalyMetrics:
    """Stands in for AnomalyMetrics and keeps every score map evaluate hands it."""

    maps: ClassVar[list[np.ndarray]] = []

    def __init__(self, mode: str = "histogram") -> None:
        from segmentation_safety.metrics import AnomalyMetrics

        self._inner = AnomalyMetrics(mode=mode)

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        self.maps.append(np.array(scores, copy=True))
        self._inner.update(scores, labels)

    def compute(self):  # noqa: ANN201
        return self._inner.compute()


def _scored_maps(monkeypatch, pipeline: Pipeline, sample: dict, score_at: str):
    """(the map evaluate scored for the pipeline's only detector, the report)."""
    monkeypatch.setattr("training.evaluate.AnomalyMetrics", _RecordingAnomalyMetrics)
    _RecordingAnomalyMetrics.maps = []
    report = evaluate(pipeline, [sample], metrics_mode="exact", progress=False, score_at=score_at)
    (scored,) = _RecordingAnomalyMetrics.maps
    return scored, report


def test_score_at_label_scores_the_logits_upsampled_to_the_label_size(monkeypatch):
    torch.manual_seed(0)
    seg = build_segmenter("tiny", num_classes=19, width=8)  # logits at stride 4: 8×16
    with torch.no_grad():  # confident logits: the softmax is far from linear in them
        seg.classifier.weight *= 30.0
    pipeline = Pipeline(seg, {"max_softmax": registry.build("max_softmax", seg)},
                        PipelineConfig(anomaly=None, device="cpu"))  # fmt: skip
    image, _, anomaly = _scene(0)
    sample = {"image": image, "anomaly": anomaly}
    at_label, report = _scored_maps(monkeypatch, pipeline, sample, "label")
    at_network, default = _scored_maps(monkeypatch, pipeline, sample, "network")

    # Independently: the network's logits, upsampled (bilinear, align_corners=False), then
    # 1 - max softmax per pixel; and the other order for the default.
    with torch.no_grad():
        logits = seg(seg.normalize(torch.from_numpy(image).permute(2, 0, 1)[None])).logits
    up = torch.nn.functional.interpolate(logits, (H, W), mode="bilinear", align_corners=False)
    expected_label = (1 - up.softmax(1).amax(1))[0].numpy()
    score = 1 - logits.softmax(1).amax(1, keepdim=True)
    expected_network = torch.nn.functional.interpolate(
        score, (H, W), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    assert logits.shape[-2:] == (H // 4, W // 4)
    np.testing.assert_allclose(at_label, expected_label, atol=1e-6)
    np.testing.assert_allclose(at_network, expected_network, atol=1e-6)
    assert np.abs(at_label - at_network).max() > 1e-2  # the orders really differ
    assert (report.score_at, report.scored_at) == ("label", {"max_softmax": "label"})
    assert (default.score_at, default.scored_at) == ("network", {"max_softmax": "network"})


def test_a_feature_detector_keeps_the_network_order_and_says_so(monkeypatch):
    torch.manual_seed(0)
    seg = build_segmenter("tiny", num_classes=19, width=8)
    image, _, anomaly = _scene(1)
    sample = {"image": image, "anomaly": anomaly}
    densehybrid = registry.build("densehybrid", seg)  # reads the pre-logit features
    alone = Pipeline(seg, {"densehybrid": densehybrid}, PipelineConfig(anomaly=None, device="cpu"))
    at_label, _ = _scored_maps(monkeypatch, alone, sample, "label")
    at_network, _ = _scored_maps(monkeypatch, alone, sample, "network")
    np.testing.assert_array_equal(at_label, at_network)

    both = Pipeline(
        seg,
        {"densehybrid": densehybrid, "max_softmax": registry.build("max_softmax", seg)},
        PipelineConfig(anomaly=None, device="cpu"),
    )
    report = evaluate(both, [sample], metrics_mode="exact", progress=False, score_at="label")
    assert report.scored_at == {"densehybrid": "network", "max_softmax": "label"}
    assert report_json(report)["score_at"] == {
        "requested": "label",
        "detectors": {"densehybrid": "network", "max_softmax": "label"},
    }
    with pytest.raises(ValueError, match="score_at"):
        evaluate(both, [sample], progress=False, score_at="labels")


def test_score_at_flag_is_parsed_noted_once_and_recorded(
    world: Path, models: Path, tmp_path: Path, capsys
):
    out = tmp_path / "R.json"
    common = (
        "--root", str(world), "--split", "anomaly", "--models", str(models),
        "--detectors", "max_softmax,densehybrid", "--metrics", "exact", "--quiet",
    )  # fmt: skip
    assert _cli(*common, "--out", str(out)) == 0
    assert "--score-at" not in capsys.readouterr().err
    default = json.loads(out.read_text())
    assert default["score_at"] == {
        "requested": "network",
        "detectors": {"max_softmax": "network", "densehybrid": "network"},
    }

    assert _cli(*common, "--score-at", "label", "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert err.count("--score-at label") == 1 and "densehybrid" in err
    report = json.loads(out.read_text())
    assert report["score_at"] == {
        "requested": "label",
        "detectors": {"max_softmax": "label", "densehybrid": "network"},
    }
    anomaly = {n: report["detectors"][n]["anomaly"] for n in ("max_softmax", "densehybrid")}
    assert anomaly["densehybrid"] == default["detectors"]["densehybrid"]["anomaly"]
    assert anomaly["max_softmax"] != default["detectors"]["max_softmax"]["anomaly"]
    md = (tmp_path / "R.md").read_text()
    assert "Scores (--score-at label)" in md and "they cannot be scored from the logits alone" in md
    with pytest.raises(SystemExit):
        _cli(*common, "--score-at", "pixels", "--out", str(out))
