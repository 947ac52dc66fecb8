"""`segsafe bench --node`: the real node's latency by stage at several frame sizes, one run.

One :class:`~segmentation_safety.ros.replay.Replayer` (node + collector, each in its own
rclpy context) per variant (frame size × ``output_scale`` × how the camera sends frames:
raw Images or jpeg CompressedImages), all alive at once. Rounds
interleave the variants, one frame in flight at a time: a frame is published to one
node, its ``safety`` awaited, then the next variant's frame. So every variant sees the
same machine load, and latencies hold no queueing (the node's steady-state cost per
frame, not its backlog). Frames are the bag's images resized to each size (a real scene:
the label map's boundaries, which the post-processing cost depends on, are realistic).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segmentation_safety.bags import (
    COMPRESSED_TYPE,
    IMAGE_TYPE,
    BagContents,
    BagError,
    BagFrame,
    cdr_stamp_ns,
    read_bag,
    with_stamp,
)
from segmentation_safety.ros.replay import Replayer, ReplayError, ReplayOptions, Trial
from segmentation_safety.ros.replay_report import (
    BREAKDOWN_STAGES,
    breakdown_summary,
    delivery_label,
    latency_summary,
    outputs_label,
)

#: The node's /diagnostics values a bench report keeps.
NODE_SAID = ("device", "jpeg_codec", "opencv_threads", "faults", "last_problem")


@dataclass(frozen=True)
class Variant:
    """One node configuration under test."""

    height: int
    width: int
    output_scale: float = 1.0
    #: How the camera sends its frames: "raw" (rgb8 Images on `image`) or "jpeg"
    #: (CompressedImages on `image/compressed`, the node with input_transport compressed).
    input: str = "raw"

    @property
    def name(self) -> str:
        scale = "" if self.output_scale == 1.0 else f" output_scale {self.output_scale:g}"
        sent = "" if self.input == "raw" else f" {self.input}"
        return f"{self.height}x{self.width}{scale}{sent}"


#: What --inputs accepts: jpeg frames are encoded at encode_jpeg's default quality (90,
#: as make-bag encodes them).
INPUTS = ("raw", "jpeg")


def parse_inputs(text: str) -> list[str]:
    """``"raw,jpeg"`` -> ["raw", "jpeg"]."""
    inputs = [x.strip().lower() for x in text.split(",") if x.strip()]
    bad = [x for x in inputs if x not in INPUTS]
    if bad or not inputs:
        raise ValueError(f"inputs {text!r}: expected one or more of {', '.join(INPUTS)}")
    return inputs


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"512x1024,1024x2048"`` -> [(512, 1024), (1024, 2048)] (height x width)."""
    sizes = []
    for item in text.split(","):
        h, sep, w = item.strip().lower().partition("x")
        if not sep or not h.isdigit() or not w.isdigit() or int(h) < 16 or int(w) < 16:
            raise ValueError(f"size {item!r}: expected HEIGHTxWIDTH, each at least 16")
        sizes.append((int(h), int(w)))
    return sizes


def resized_frames(
    bag: BagContents, height: int, width: int, count: int
) -> list[tuple[Any, np.ndarray]]:
    """The bag's first ``count`` images as (header, RGB pixels) resized to
    ``height``×``width``."""
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import CompressedImage, Image

    from segmentation_safety.ros.image_codec import ImageCodec

    codec = ImageCodec()
    msg_type = CompressedImage if bag.compressed else Image
    out = []
    for i, frame in enumerate(bag.frames[:count]):
        try:
            msg = deserialize_message(frame.raw, msg_type)
            rgb = codec.decode(msg)
        except Exception as e:  # rclpy's and the codec's errors: the frames are resized here
            raise BagError(
                f"bag {bag.path}: frame {i} on {bag.image_topic} (stamp {frame.stamp_ns}) "
                f"cannot be benchmarked: {e}"
            ) from None
        shrink = height * width < rgb.shape[0] * rgb.shape[1]
        rgb = cv2.resize(
            np.ascontiguousarray(rgb),
            (width, height),
            interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
        )
        out.append((msg.header, rgb))
    return out


def serialised(frames: Sequence[tuple[Any, np.ndarray]], sent: str = "raw") -> list[bytes]:
    """(header, RGB pixels) as serialised rgb8 Images, or for ``sent`` "jpeg"
    CompressedImages as compressed_image_transport sends them."""
    from rclpy.serialization import serialize_message

    from segmentation_safety.ros import cdr
    from segmentation_safety.ros.image_codec import encode_jpeg

    if sent == "jpeg":
        return [serialize_message(encode_jpeg(rgb, header)) for header, rgb in frames]
    out = []
    for header, rgb in frames:
        h, w = rgb.shape[:2]
        out.append(cdr.serialize_body(cdr.image_body(header, h, w, "rgb8", w * 3, rgb)))
    return out


def frames_at(
    bag: BagContents, height: int, width: int, count: int, sent: str = "raw"
) -> list[bytes]:
    """The bag's first ``count`` images resized to ``height``×``width``, serialised as
    :func:`serialised` does (headers kept)."""
    return serialised(resized_frames(bag, height, width, count), sent)


def node_bench(
    bag_path: Path,
    variants: Sequence[Variant],
    options: ReplayOptions,
    rounds: int = 10,
    distinct_frames: int = 5,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Latency and its breakdown per variant, measured interleaved in one process."""
    if rounds < 1:
        raise ReplayError("--frames must be at least 1")
    bag = read_bag(bag_path, max_frames=distinct_frames)
    # Decoded and resized once per size, serialised once per size and input: variants
    # differing only in output_scale share them.
    by_size: dict[tuple[int, int], list[tuple[Any, np.ndarray]]] = {}
    sent: dict[tuple[int, int, str], list[bytes]] = {}
    for v in variants:
        if (v.height, v.width) not in by_size:
            by_size[v.height, v.width] = resized_frames(bag, v.height, v.width, distinct_frames)
        key = (v.height, v.width, v.input)
        if key not in sent:
            sent[key] = serialised(by_size[v.height, v.width], v.input)
    inputs = {v: sent[v.height, v.width, v.input] for v in variants}
    # The bag's camera model with every frame, as a camera sends it: without one the node
    # publishes no hazard boxes, and their cost would be left out. The node scales K from
    # the info's size to each variant's.
    info = next(iter(bag.camera_info.values()), None)
    trials = {v: Trial({}, {}, {}) for v in variants}
    with contextlib.ExitStack() as stack:
        replayers = {}
        for v in variants:
            frames = [BagFrame(i, cdr_stamp_ns(raw), raw) for i, raw in enumerate(inputs[v])]
            # A jpeg variant's bag is compressed: the replayer then feeds image/compressed
            # and starts its node with input_transport compressed.
            msgtype = COMPRESSED_TYPE if v.input == "jpeg" else IMAGE_TYPE
            contents = BagContents(bag.path, bag.image_topic, frames, image_msgtype=msgtype)
            params = {**options.parameters, "output_scale": v.output_scale}
            replayers[v] = stack.enter_context(
                Replayer(contents, replace(options, parameters=params))
            )
        for r in replayers.values():
            r.warm_up()
        unanswered = dict.fromkeys(variants, 0)
        for i in range(rounds):
            for v, r in replayers.items():
                raw = inputs[v][i % len(inputs[v])]
                stamp = (1000 + i) * 1_000_000_000  # unique, never a recorded stamp
                t = r.play([(0.0, with_stamp(raw, stamp), info)])
                unanswered[v] = 0 if t.answered else unanswered[v] + 1
                try:
                    r.check_alive(unanswered[v])
                except ReplayError as e:
                    raise ReplayError(f"bench --node, variant {v.name}: {e}") from None
                trials[v].sent.update(t.sent)
                trials[v].answered.update(t.answered)
                trials[v].stages.update(t.stages)
                trials[v].rejected += t.rejected
            if progress:
                progress(i + 1, rounds)
        said = {}
        for v, r in replayers.items():
            if r.collector is not None:
                r.collector.wait_statuses(1, time.monotonic() + 5.0)  # a fresh one
            said[v] = dict(r.collector.node_status) if r.collector else {}
    results = {}
    for v, trial in trials.items():
        lat = [ms for _, ms in trial.latencies_ms()]
        results[v.name] = {
            "height": v.height,
            "width": v.width,
            "output_scale": v.output_scale,
            "input": v.input,
            "frames_sent": trial.frames_sent,
            "frames_processed": trial.frames_processed,
            "latency_ms": latency_summary(lat),
            "breakdown": breakdown_summary(trial),
            # What the node says it ran (its /diagnostics), not what was asked: a jpeg
            # the GPU could not take, or a device fallback, shows here.
            "node_said": {k: said[v][k] for k in NODE_SAID if k in said[v]},
        }
    return {
        "bag": str(bag_path),
        "rounds": rounds,
        "outputs": outputs_label(options),
        "delivery": delivery_label(options),
        "parameters": options.parameters,
        "camera_info": info is not None,
        "variants": results,
    }


def turns_note(node_process: bool, variants: int) -> str | None:
    """What to say under a bench whose variants each ran a node process of their own.

    Why: on this project's machine, node processes taking turns in one run waited 2.5-35 ms
    longer a frame for their input (`dispatch`) in some states, and a node alone did not
    (docs/performance.md, 2026-12-08). In one process every node shares one compute
    thread, and that was never seen.
    """
    if not node_process or variants < 2:
        return None
    return (
        f"note: the {variants} variants' nodes ran in processes of their own, taking turns; "
        "in some machine states that delays every node's input (dispatch) by several ms. "
        "For one camera's node, bench one variant per run (docs/performance.md)."
    )


def format_node_table(report: dict[str, Any]) -> str:
    """A Markdown table: mean ms per stage and the node overhead, one row per variant."""
    head = ["frame", "end-to-end", *BREAKDOWN_STAGES, "overhead ms", "overhead %", "host ms"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for name, r in report["variants"].items():
        b = r["breakdown"]
        if b is None:
            lines.append(f"| {name} | no answer |" + " - |" * (len(head) - 2))
            continue
        s = b["stages_ms"]
        o = b["node_overhead"]
        cells = [
            f"{s['end_to_end']['mean']:.1f}",
            *(f"{s[k]['mean']:.1f}" for k in BREAKDOWN_STAGES),
        ]
        cells += [f"{o['ms_mean']:.1f}", f"{100 * o['fraction_of_mean']:.1f}%"]
        cells.append(f"{o['host_ms_mean']:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
