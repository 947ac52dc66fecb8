"""The shipped demo models load, and a small re-evaluation agrees with models/demo/REPORT.md."""

from __future__ import annotations

import json
import re

import pytest

from segmentation_safety.cli import main
from segmentation_safety.pipeline import DEMO_MODELS, Pipeline, PipelineConfig

REPORT = DEMO_MODELS / "REPORT.md"


def _subset_block() -> dict:
    """The JSON block REPORT.md quotes for the re-evaluated subset."""
    text = REPORT.read_text()
    match = re.search(r"<!-- subset-check -->\s*```json\s*(\{.*?\})\s*```", text, re.S)
    assert match, "REPORT.md has no subset-check JSON block"
    return json.loads(match.group(1))


def test_demo_models_are_shipped_small_and_load():
    files = sorted(DEMO_MODELS.glob("*.safetensors"))
    kinds = {f.stem for f in files}
    assert {"segmenter", "densehybrid", "sml", "flow", "flowenedet", "flowenedet_c",
            "generator", "comparison"} <= kinds  # fmt: skip
    assert sum(f.stat().st_size for f in files) < 25 * 2**20
    config = PipelineConfig(
        anomaly="densehybrid", failure="flowenedet_u", class_iou="resynthesis", device="cpu"
    )
    pipe = Pipeline.from_models_dir(DEMO_MODELS, config)
    assert len(pipe.class_names) == pipe.segmenter.num_classes == 19


@pytest.mark.slow
def test_re_evaluation_agrees_with_the_report(tmp_path):
    from training.world.writer import write_world

    block = _subset_block()
    world = tmp_path / "world"
    write_world(world, seed=block["seed"], train=0, val=0, anomaly=block["images"],
                sequences=0, negatives=0, height=block["height"], width=block["width"],
                progress=False)  # fmt: skip
    out = tmp_path / "R.json"
    rc = main(["evaluate", "--root", str(world), "--split", "anomaly", "--quiet",
               "--detectors", ",".join(block["anomaly"]), "--out", str(out)])  # fmt: skip
    assert rc == 0
    got = json.loads(out.read_text())
    assert got["images"] == block["images"]
    for name, expected in block["anomaly"].items():
        for metric, value in expected.items():
            assert got["detectors"][name]["anomaly"][metric] == pytest.approx(value, abs=2e-3), (
                name,
                metric,
            )
