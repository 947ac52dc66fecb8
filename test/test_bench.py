"""segsafe bench: one run times the segmenter and each detector; B.json has the DESIGN keys."""

from __future__ import annotations

import json

import torch

from segmentation_safety.bench import bench
from segmentation_safety.checkpoint import save_bundle
from segmentation_safety.cli import main
from segmentation_safety.detectors import Detector, registry
from segmentation_safety.models.zoo import build_segmenter, segmenter_metadata
from segmentation_safety.types import DetectorOutput, SegmenterOutput


class Work(Detector):
    """A detector whose cost is a known amount of arithmetic: ``rounds`` 128×128 matmuls."""

    name = "work"
    produces = frozenset({"anomaly"})

    def __init__(self, segmenter, rounds: int) -> None:
        super().__init__(segmenter)
        self.rounds = rounds

    def forward(self, out: SegmenterOutput) -> DetectorOutput:
        m = torch.full((128, 128), 1e-3)
        acc = m
        for _ in range(self.rounds):
            acc = acc @ m
        return DetectorOutput(anomaly=out.logits[:, 0] + acc[0, 0])


def test_more_work_in_a_detector_shows_as_more_overhead():
    # 200 matmuls against none: orders of magnitude apart, so load on a shared machine
    # cannot swap them (no timing threshold is asserted).
    seg = build_segmenter("tiny", num_classes=4, width=4)
    dets = {"light": Work(seg, 0), "heavy": Work(seg, 200)}
    data = bench(seg, dets, 32, 64, torch.device("cpu"), repeats=3, warmup=1).to_json()
    light, heavy = data["detectors"]["light"], data["detectors"]["heavy"]
    assert heavy["ms"] > light["ms"] and heavy["overhead"] > light["overhead"]


def test_overhead_is_added_time_over_the_segmentation_pass_of_the_same_run(monkeypatch):
    # One Pipeline.run per round with every detector: its timings give both sides. Rounds
    # that run slower (a loaded machine) scale both sides alike; one slow round moves a
    # median, not a mean.
    from segmentation_safety.pipeline import Pipeline

    calls = []

    def run(self, images, detectors=None, class_max_in_pass=False):
        assert class_max_in_pass  # no detector is charged for the labels' class max
        calls.append(list(detectors))
        k = (5, 7, 1, 9, 2)[len(calls) - 1]  # round's slowdown
        timings = {"preprocess": 1.0 * k, "segmenter": 9.0 * k}
        timings |= {f"detector/{n}": ms * k for n, ms in (("a", 2.0), ("b", 0.5))}
        return None, {}, timings

    monkeypatch.setattr(Pipeline, "run", run)
    seg = build_segmenter("tiny", num_classes=4, width=4)
    dets = {n: registry.build("max_softmax", seg) for n in ("a", "b")}
    data = bench(seg, dets, 8, 16, torch.device("cpu"), repeats=3, warmup=2).to_json()
    assert calls == [["a", "b"]] * 5  # every detector in every round, warm-up included
    # Rounds 3..5 timed (slowdowns 1, 9, 2; median 2, mean 4): medians 20 ms
    # (segmentation), 4 and 1 ms (detectors).
    assert data["segmentation_ms"] == 20.0
    assert data["detectors"]["a"]["ms"] == 4.0 and data["detectors"]["a"]["overhead"] == 0.2
    assert data["detectors"]["b"]["ms"] == 1.0 and data["detectors"]["b"]["overhead"] == 0.05


def test_the_class_max_is_part_of_the_pass_not_of_the_first_detector_using_it(monkeypatch):
    from segmentation_safety.types import SegmenterOutput as Out

    seg = build_segmenter("tiny", num_classes=4, width=4)
    stages = []
    real = Out.class_max

    def class_max(self):
        stages.append(self._class_max is None)  # True: computed now
        return real(self)

    monkeypatch.setattr(Out, "class_max", class_max)
    dets = {"max_logit": registry.build("max_logit", seg)}
    bench(seg, dets, 16, 32, torch.device("cpu"), repeats=1, warmup=0)
    # Computed once in the pass; max_logit then finds it there.
    assert stages == [True, False]


def test_mc_dropout_says_what_its_samples_cost():
    seg = build_segmenter("tiny", num_classes=4, width=4)  # dropout only before its head
    det = registry.build("mc_dropout", seg, samples=3)
    data = bench(seg, {"mc_dropout": det}, 16, 32, torch.device("cpu"), repeats=1, warmup=0)
    assert data.detectors["mc_dropout"].note == "T=3 samples: dropout + classifier re-run 3 times"


def test_b_json_has_the_design_keys():
    seg = build_segmenter("tiny", num_classes=4, width=4)
    dets = {n: registry.build(n, seg) for n in ("max_softmax", "energy")}
    data = bench(seg, dets, 32, 64, torch.device("cpu"), repeats=1, warmup=0).to_json()
    data = json.loads(json.dumps(data))  # what B.json holds
    assert isinstance(data["device"], str) and data["device"] == "cpu"
    assert (data["height"], data["width"]) == (32, 64)
    assert isinstance(data["segmentation_ms"], float) and data["segmentation_ms"] > 0
    assert set(data["detectors"]) == {"max_softmax", "energy"}
    for t in data["detectors"].values():
        assert isinstance(t["ms"], float) and isinstance(t["overhead"], float)
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
    from segmentation_safety.bench import DetectorTiming
    from segmentation_safety.detectors.registry import detector_class

    # DESIGN §7's budgets, declared by the detectors themselves (one registry).
    design = {"max_softmax": 0.03, "sml": 0.03, "densehybrid": 0.03, "flowenedet_c": 0.10,
              "flow_density": 0.25, "resynthesis_anomaly": 2.0, "mc_dropout": None}  # fmt: skip
    assert {n: detector_class(n).budget for n in design} == design
    assert DetectorTiming(ms=9.0, overhead=0.09, budget=0.10).within_budget is True
    assert DetectorTiming(ms=11.0, overhead=0.11, budget=0.10).within_budget is False
    assert DetectorTiming(ms=11.0, overhead=0.11).within_budget is None
    # "At most" the budget (DESIGN §7): exactly on it is within.
    assert DetectorTiming(ms=2.5, overhead=0.25, budget=0.25).within_budget is True


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


def test_cli_notes_when_the_node_would_run_the_network_at_another_size(tmp_path, capsys):
    models = tmp_path / "models"
    seg = build_segmenter("tiny", num_classes=4, width=4)
    meta = {**segmenter_metadata(seg), "input_size": [32, 64]}
    save_bundle(models / "segmenter.safetensors", seg.state_dict(), meta)
    for size, noted in ((("32", "64"), False), (("48", "64"), True)):
        rc = main(["bench", "--models", str(models), "--height", size[0], "--width", size[1],
                   "--detectors", "max_logit", "--repeats", "1", "--warmup", "0",
                   "--out", str(tmp_path / "B.json")])  # fmt: skip
        assert rc == 0
        err = capsys.readouterr().err
        assert ("the node runs this segmenter at its bundle's 32x64" in err) == noted, err


def test_cli_refuses_unknown_detector_and_missing_models(tmp_path, capsys):
    rc = main(["bench", "--segmenter", "tiny", "--detectors", "nope", "--out", str(tmp_path / "b")])
    assert rc == 2
    assert "unknown detector 'nope'; known detectors:" in capsys.readouterr().err
    rc = main(["bench", "--models", str(tmp_path / "none"), "--out", str(tmp_path / "b")])
    assert rc == 2
    assert "segmenter.safetensors: file not found" in capsys.readouterr().err


def test_cli_refuses_bad_counts_and_an_out_it_cannot_write_before_any_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    out = str(tmp_path / "b.json")
    cases = [
        (["--out", str(tmp_path)], "is a directory; give a file name"),
        (["--out", str(afile / "b.json")], "is a file, not a directory"),
        (["--repeats", "0", "--out", out], "--repeats must be at least 1"),
        (["--threads", "-1", "--out", out], "--threads must be at least 1"),
        (["--segmenter", "bogus", "--out", out], "--segmenter: unknown segmenter 'bogus'"),
    ]
    for argv, words in cases:
        assert main(["bench", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
