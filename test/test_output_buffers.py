"""Output messages laid out before rendering, and re-stamped from the last frame's."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

if "segmentation_safety" not in os.environ.get("AMENT_PREFIX_PATH", ""):
    pytest.skip("install space not sourced: run through `make test`", allow_module_level=True)

from segmentation_safety.msg import HazardAlarm, SafetyFrame, StageTiming  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from segmentation_safety.ros import cdr, output_buffers  # noqa: E402

pytestmark = pytest.mark.ros

PICTURES = {
    "labels": output_buffers.Picture((3, 5), np.uint8, "mono8"),  # 15 bytes: realigned after
    "color": output_buffers.Picture((3, 5, 3), np.uint8, "rgb8"),
    "anomaly": output_buffers.Picture((2, 3), np.float32, "32FC1"),
}
#: The anomaly map in `failure`, so that `anomaly`, an Image left at its defaults (stamp
#: zero), lies between the carried ones.
CARRIED = {"labels": "segmentation", "anomaly": "failure"}


def _header(sec: int, frame_id: str = "camera") -> Header:
    h = Header(frame_id=frame_id)
    h.stamp.sec, h.stamp.nanosec = sec, 1000 + sec if sec else 0  # 0: a zero stamp
    return h


def _head(header: Header) -> SafetyFrame:
    # anomaly's Image keeps a zero stamp: only the frame's stamp is the frame's to change.
    return SafetyFrame(header=header, anomaly=Image())


def _finished(buffers: output_buffers.OutputBuffers, header: Header, seed: int) -> dict:
    """Render random pixels into ``buffers`` and finish ``safety``: every message's bytes."""
    rng = np.random.default_rng(seed)
    for place in buffers.into.values():
        place[...] = rng.integers(0, 200, place.shape).astype(place.dtype)
    tail = SafetyFrame(header=header, alarm=HazardAlarm(max_score=float(seed)),
                       timings=[StageTiming(stage="total", ms=math.nan)])  # fmt: skip
    assert cdr.finish_layout(buffers.safety, tail, buffers.last)
    out = {name: bytes(m) for name, m in buffers.messages.items()}
    out["safety"] = bytes(buffers.safety.data[: buffers.safety.size])
    return out


@pytest.mark.parametrize("first_sec", [5, 0])
def test_a_frame_laid_out_from_a_kept_layout_is_laid_out_as_if_afresh(monkeypatch, first_sec):
    # A first frame stamped zero, as the anomaly Image's own stamp is, must not make
    # that Image's stamp the frames' to change.
    layouts = output_buffers.OutputLayouts(_head)
    made = []
    lay_out = output_buffers.lay_out_outputs
    monkeypatch.setattr(output_buffers, "lay_out_outputs", lambda *a: made.append(1) or lay_out(*a))
    first = layouts.lay_out(_header(first_sec), PICTURES, {"color"}, CARRIED)
    first_bytes = _finished(first, _header(first_sec), seed=1)
    for sec in (6, 7):  # re-stamped copies, each frame's own memory
        again = layouts.lay_out(_header(sec), PICTURES, {"color"}, CARRIED)
        fresh = lay_out(_header(sec), PICTURES, {"color"}, CARRIED, _head)
        assert again.into.keys() == fresh.into.keys() and again.last == fresh.last
        assert again.safety.spans == fresh.safety.spans
        for name, place in again.into.items():
            assert place.shape == fresh.into[name].shape and place.dtype == fresh.into[name].dtype
            assert not np.shares_memory(place, first.into[name])
        assert _finished(again, _header(sec), seed=sec) == _finished(fresh, _header(sec), sec)
    assert len(made) == 2  # the kept layout and its probe, made once
    # The first frame's messages are untouched by the later ones.
    assert {k: bytes(v) for k, v in first.messages.items()} == {
        k: v for k, v in first_bytes.items() if k != "safety"
    }
    # Another frame id or size is laid out anew.
    layouts.lay_out(_header(8, "other"), PICTURES, {"color"}, CARRIED)
    wider = {**PICTURES, "color": output_buffers.Picture((3, 6, 3), np.uint8, "rgb8")}
    layouts.lay_out(_header(9, "other"), wider, {"color"}, CARRIED)
    assert len(made) == 6
