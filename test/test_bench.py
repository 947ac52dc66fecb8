"""segsafe bench: one run times the segmenter and each detector; B.json has the DESIGN keys."""

from __future__ import annotations

import json

import pytest
import torch

from segmentation_safety.bench import bench
from segmentation_safety.checkpoint import save_bundle
from segmentation_safety.cli import main
from segmentation_safety.detectors import registry
from segmentation_safety.models.zoo import build_segmenter, segmenter_metadata


def test_bench_reports_overhead_as_ratio_of_the_same_run():
    seg = build_segmenter("tiny", num_classes=4, width=4)
    dets = {n: registry.build(n, seg) for n in ("max_softmax", "energy")}
    report = bench(seg, dets, 32, 64, torch.device("cpu"), repeats=2, warmup=1)
    data = report.to_json()
    assert {"device", "height", "width", "segmentation_ms", "detectors"} <= set(data)
    assert data["height"] == 32 and data["width"] == 64 and data["segmentation_ms"] > 0
    for name in ("max_softmax", "energy"):
        t = data["detectors"][name]
        assert t["ms"] > 0
        assert t["overhead"] == pytest.approx(t["ms"] / data["segmentation_ms"])
        assert t["budget"] == 0.03  # DESIGN §7: softmax family
        assert t["within_budget"] == (t["overhead"] <= 0.03)


def test_bench_feeds_frames_laid_out_as_the_pipeline_does(monkeypatch):
    # The node's frames are H×W×3 memory seen as 3×H×W; networks run faster on that
    # layout, so timing a contiguous 3×H×W tensor would misstate the segmentation pass.
    from segmentation_safety.pipeline import Pipeline, PipelineConfig

    seg = build_segmenter("tiny", num_classes=4, width=4)
    pipe = Pipeline(seg, {}, PipelineConfig(anomaly=None, device="cpu"))
    node_frame = pipe.to_input(torch.zeros(8, 16, 3, dtype=torch.uint8))
    seen = []
    normalize = seg.normalize
    monkeypatch.setattr(seg, "normalize", lambda x: seen.append(x.stride()) or normalize(x))
    bench(seg, {}, 8, 16, torch.device("cpu"), repeats=1, warmup=0)
    assert seen and seen[0] == node_frame.stride()


def test_fp16_autocast_is_cuda_only_and_named_in_the_table():
    from segmentation_safety.commands.bench import format_table

    seg = build_segmenter("tiny", num_classes=4, width=4)
    dtypes = []
    seg.register_forward_hook(lambda m, i, o: dtypes.append(o.logits.dtype))
    report = bench(seg, {}, 16, 32, torch.device("cpu"), repeats=1, warmup=0, half=True)
    assert report.half is False and report.to_json()["half"] is False
    assert set(dtypes) == {torch.float32}  # no autocast on the CPU
    assert "autocast" not in format_table(report)
    report.half = True  # as a CUDA run reports it
    assert "(fp16 autocast)" in format_table(report)


def test_budget_flags_follow_the_measured_overhead():
    from segmentation_safety.bench import BUDGETS, DetectorTiming
    from segmentation_safety.detectors.registry import available

    assert set(BUDGETS) <= set(available())  # no budget for a detector that does not exist
    assert DetectorTiming(ms=9.0, overhead=0.09, budget=0.10).within_budget is True
    assert DetectorTiming(ms=11.0, overhead=0.11, budget=0.10).within_budget is False
    assert DetectorTiming(ms=11.0, overhead=0.11).within_budget is None


def test_cli_writes_b_json_and_marks_untrained_parts(tmp_path, capsys):
    models = tmp_path / "models"
    seg = build_segmenter("tiny", num_classes=4, width=4)
    save_bundle(models / "segmenter.safetensors", seg.state_dict(), segmenter_metadata(seg))
    out = tmp_path / "B.json"
    rc = main(
        ["bench", "--models", str(models), "--height", "32", "--width", "64",
         "--detectors", "max_logit,densehybrid", "--repeats", "1", "--warmup", "0",
         "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["detectors"]) == {"max_logit", "densehybrid"}
    assert data["detectors"]["densehybrid"]["trained"] is False
    assert data["detectors"]["max_logit"]["trained"] is True
    assert "| densehybrid |" in capsys.readouterr().out


def test_cli_refuses_unknown_detector_and_missing_models(tmp_path, capsys):
    rc = main(["bench", "--segmenter", "tiny", "--detectors", "nope", "--out", str(tmp_path / "b")])
    assert rc == 2
    assert "unknown detector 'nope'; known detectors:" in capsys.readouterr().err
    rc = main(["bench", "--models", str(tmp_path / "none"), "--out", str(tmp_path / "b")])
    assert rc == 2
    assert "segmenter.safetensors: file not found" in capsys.readouterr().err
