"""What ``segsafe replay`` reports: T.json, the latency plot and the hazard overlays.

The replayer (:mod:`segmentation_safety.ros.replay`) plays a bag through the node and
returns a :class:`~segmentation_safety.ros.replay.Trial` with the outputs it kept; this
module turns them into numbers and files. Latency percentiles, the per-stage breakdown
read from each SafetyFrame's timings, anomaly metrics against the bag's ground truth,
the plot and the overlay PNGs. It needs the package's messages (rclpy's
deserialisation), hence ``ros/``; it starts no node.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rclpy.serialization import deserialize_message

if TYPE_CHECKING:  # the replayer imports this module: names for annotations only
    from segmentation_safety.bags import BagContents
    from segmentation_safety.ros.replay import ReplayOptions, Trial


# -- latency and its breakdown -----------------------------------------------------------
def latency_summary(latencies_ms: list[float]) -> dict[str, float | None]:
    """p50/p95/p99/max (ms); None where nothing was answered (JSON has no NaN)."""
    if not latencies_ms:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    a = np.asarray(latencies_ms, np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(a.max()),
            "mean": float(a.mean())}  # fmt: skip


def safety_timings(raw: bytes) -> dict[str, float]:
    """A serialised SafetyFrame's stage timings, read without copying its maps."""
    from segmentation_safety.msg import SafetyFrame
    from segmentation_safety.ros import cdr

    try:
        fields = cdr.read_fields(raw, SafetyFrame, {"timings"})
    except (cdr.CdrError, ValueError, UnicodeDecodeError):
        return {}
    return {t["stage"]: float(t["ms"]) for t in fields.get("timings", [])}


#: Breakdown stages in the order a frame passes them (detectors summed as one).
BREAKDOWN_STAGES = ("transport_in", "dispatch", "queue", "decode", "preprocess", "segmenter",
                    "detectors", "postprocess", "publish", "other", "transport_out",
                    "subscriber")  # fmt: skip
#: Stages that run on the pipeline's device; the overhead's other stages stay on the host
#: whatever the device, and on a GPU node decide whether it is bound by its network.
DEVICE_STAGES = ("preprocess", "segmenter", "detectors", "postprocess")
HOST_STAGES = tuple(s for s in BREAKDOWN_STAGES if s not in DEVICE_STAGES)
#: DESIGN §7: the node's own work per frame (decode, post-process, publish) at most this
#: share of the frame.
NODE_BUDGET = 0.10


def frame_breakdown(latency_ms: float, stages: dict[str, float]) -> dict[str, float] | None:
    """One frame's end-to-end latency split into BREAKDOWN_STAGES, plus the node overhead.

    From the SafetyFrame timings: the node's ``total`` runs from decode until ``safety``,
    serialised, is handed to the middleware, so ``transport_out`` is the rest: delivering
    ``safety``. ``other`` is the node's time outside the named stages.
    ``subscriber`` (the collector's, where the middleware gave its delivery time) is how
    long the delivered answer waited for the subscriber's callback: still counted, as a
    consumer of the node sees it, and apart, so that a slow consumer shows as one.
    Overhead = end-to-end - network - detectors: what the node adds to its models.
    None when the frame has no timings (an older node).
    """
    if "total" not in stages or "segmenter" not in stages:
        return None
    out = {k: stages.get(k, 0.0) for k in ("transport_in", "dispatch", "queue", "decode",
                                            "preprocess", "segmenter", "postprocess",
                                            "publish", "subscriber")}  # fmt: skip
    out["detectors"] = sum(v for k, v in stages.items() if k.startswith("detector/"))
    named = sum(out[k] for k in ("decode", "preprocess", "segmenter", "detectors",
                                 "postprocess", "publish"))  # fmt: skip
    out["other"] = max(stages["total"] - named, 0.0)
    before = out["transport_in"] + out["dispatch"] + out["queue"]
    # The subscriber's wait is clamped to what the node's stages leave of the latency, as
    # transport_out is to 0 (the two clocks' readings can disagree by a little).
    out["subscriber"] = min(out["subscriber"], max(latency_ms - before - stages["total"], 0.0))
    out["transport_out"] = max(latency_ms - before - stages["total"] - out["subscriber"], 0.0)
    out["end_to_end"] = latency_ms
    out["overhead"] = latency_ms - out["segmenter"] - out["detectors"]
    out["overhead_fraction"] = out["overhead"] / latency_ms if latency_ms > 0 else math.nan
    return out


def breakdown_summary(trial: Trial) -> dict[str, Any] | None:
    """Mean and p50 per stage over the answered frames, and the node overhead.

    Means add up to the mean end-to-end latency (p50s need not); the overhead fraction
    is given per frame (p50) and of the means (``fraction_of_mean``). ``queue`` is time
    a frame waited for the worker, which only an input faster than the node causes, so
    the overhead is also given without it (``*_without_queue``): the node's own work.
    ``host_ms_mean`` is the part of the overhead in HOST_STAGES.
    """
    rows = []
    for s, t_sent in trial.sent.items():
        if s in trial.answered and s in trial.stages:
            row = frame_breakdown((trial.answered[s] - t_sent) * 1e3, trial.stages[s])
            if row is not None:
                rows.append(row)
    if not rows:
        return None
    keys = [*BREAKDOWN_STAGES, "end_to_end"]
    stats = {k: {"mean": float(np.mean([r[k] for r in rows])),
                 "p50": float(np.median([r[k] for r in rows]))} for k in keys}  # fmt: skip
    overhead = [r["overhead"] for r in rows]
    fraction = [r["overhead_fraction"] for r in rows]
    work = [r["overhead"] - r["queue"] for r in rows]
    unqueued = [r["end_to_end"] - r["queue"] for r in rows]
    work_fraction = [w / u for w, u in zip(work, unqueued, strict=True)]
    own = float(np.mean(work) / np.mean(unqueued))
    return {
        "frames": len(rows),
        "stages_ms": stats,
        "node_overhead": {
            "ms_mean": float(np.mean(overhead)),
            "ms_p50": float(np.median(overhead)),
            "fraction_p50": float(np.median(fraction)),
            "fraction_of_mean": float(np.mean(overhead) / stats["end_to_end"]["mean"]),
            "ms_mean_without_queue": float(np.mean(work)),
            "fraction_p50_without_queue": float(np.median(work_fraction)),
            "host_ms_mean": float(sum(stats[k]["mean"] for k in HOST_STAGES)),
            # The budget is on the node's own work, so the verdict leaves the queue out
            # (it equals fraction_of_mean where frames never wait, as in bench --node).
            "fraction_of_mean_without_queue": own,
            "budget_fraction": NODE_BUDGET,
            "within_budget": bool(own <= NODE_BUDGET),
        },
    }


def anomaly_metrics(bag: BagContents, safety: dict[int, bytes]) -> dict[str, Any] | None:
    """AP / AUROC / FPR95 of the replayed anomaly maps against the bag's ground truth."""
    from segmentation_safety.metrics import AnomalyMetrics
    from segmentation_safety.msg import SafetyFrame

    metrics = AnomalyMetrics()
    frames = 0
    detector = ""
    for stamp, raw in safety.items():
        gt = bag.gt_anomaly.get(stamp)
        if gt is None:
            continue
        frame = deserialize_message(raw, SafetyFrame)
        a = frame.anomaly
        if a.height == 0 or a.encoding != "32FC1":
            continue
        detector = frame.anomaly_detector
        scores = np.frombuffer(bytes(a.data), np.float32).reshape(a.height, a.step // 4)
        scores = scores[:, : a.width]
        if scores.shape != gt.shape:
            import cv2

            gt = cv2.resize(gt, (a.width, a.height), interpolation=cv2.INTER_NEAREST)
        metrics.update(scores, gt)
        frames += 1
    if frames == 0:
        return None
    r = metrics.compute()

    return {"detector": detector, "frames": frames, "ap": _finite(r.ap),
            "auroc": _finite(r.auroc), "fpr95": _finite(r.fpr95),
            "anomaly_pixels": int(r.num_anomaly), "inlier_pixels": int(r.num_inlier)}  # fmt: skip


def decode_rgb8(raw: bytes) -> np.ndarray:
    """A serialized rgb8 Image -> H x W x 3 uint8, read in place."""
    from segmentation_safety.ros import cdr, image_codec

    return np.ascontiguousarray(image_codec.decode_rgb(cdr.RawImage(raw)))


def plot_latency(
    trial: Trial, path: Path, title: str, breakdown: dict[str, Any] | None = None
) -> None:
    """Latency per frame over time, its histogram and (given ``breakdown_summary``) the
    mean time per stage with the node overhead, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = trial.latencies_ms()
    fig, axes = plt.subplots(1, 3 if breakdown else 2, figsize=(16 if breakdown else 11, 4))
    ax1, ax2 = axes[0], axes[1]
    if breakdown:
        _plot_breakdown(axes[2], breakdown)
    if points:
        t, lat = zip(*points)
        ax1.plot(t, lat, ".-", lw=0.8)
        ax2.hist(lat, bins=min(40, max(5, len(lat) // 2)))
    unanswered = [s for s in trial.sent if s not in trial.answered]
    if unanswered and trial.sent:
        t0 = next(iter(trial.sent.values()))
        label = f"not answered ({trial.frames_dropped} dropped, {trial.rejected} refused or failed)"
        ax1.plot([trial.sent[s] - t0 for s in unanswered], [0] * len(unanswered), "rx",
                 label=label)  # fmt: skip
        ax1.legend()
    ax1.set(xlabel="publish time (s)", ylabel="latency (ms)", title="latency per frame")
    ax2.set(xlabel="latency (ms)", ylabel="frames", title="histogram")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_breakdown(ax: Any, breakdown: dict[str, Any]) -> None:
    import matplotlib

    stages = breakdown["stages_ms"]
    # One colour a stage (the default cycle has 10): tab20's dark shades first, then its
    # light ones, so that neighbouring stages do not get a pair's two shades.
    colours = matplotlib.colormaps["tab20"]
    left = 0.0
    for i, name in enumerate(BREAKDOWN_STAGES):
        ms = stages[name]["mean"]
        shade = colours(2 * i % 20 + 2 * i // 20)
        ax.barh([0], [ms], left=left, color=shade, label=f"{name} {ms:.1f}")
        left += ms
    o = breakdown["node_overhead"]
    ax.set(xlabel="mean ms per frame", yticks=[],
           title=f"node overhead {o['ms_mean']:.1f} ms = {100 * o['fraction_of_mean']:.1f}%"
           " of end-to-end")  # fmt: skip
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)


def save_overlays(overlays: dict[int, bytes], out_dir: Path, count: int) -> list[Path]:
    """``count`` evenly spaced hazard overlays as PNGs; returns their paths."""
    import cv2

    stamps = sorted(overlays)
    if not stamps or count <= 0:
        return []
    positions = np.linspace(0, len(stamps) - 1, min(count, len(stamps)))
    picks = sorted({stamps[round(i)] for i in positions})
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, stamp in enumerate(picks):
        p = out_dir / f"overlay_{i:02d}.png"
        cv2.imwrite(str(p), cv2.cvtColor(decode_rgb8(overlays[stamp]), cv2.COLOR_RGB2BGR))
        paths.append(p)
    return paths


@dataclass
class ReplayReport:
    """T.json content plus what the command prints and plots."""

    data: dict[str, Any]
    trial: Trial
    overlays: dict[int, bytes]


def build_report(
    bag: BagContents,
    options: ReplayOptions,
    trial: Trial,
    safety: dict[int, bytes],
    overlays: dict[int, bytes],
    search: dict[str, Any] | None,
) -> ReplayReport:
    """T.json's content from the bag's replay (``trial``), its outputs and the rate search."""
    lat = [ms for _, ms in trial.latencies_ms()]
    data: dict[str, Any] = {
        "frames_sent": trial.frames_sent,
        "frames_processed": trial.frames_processed,
        "frames_dropped": trial.frames_dropped,
        "frames_rejected": trial.rejected,
        "rate_hz": _finite(trial.input_rate_hz()),
        "latency_ms": latency_summary(lat),
        "bag": str(bag.path),
        "image_topic": bag.image_topic,
        "bag_rate_hz": _finite(bag.rate_hz),
        "rate_factor": options.rate,
        "drop_fraction": trial.drop_fraction,
        "outputs": outputs_label(options),
        "delivery": delivery_label(options),
    }
    if search is not None:
        data["max_rate_hz"] = search["max_rate_hz"]
        data["rate_search"] = search
    breakdown = breakdown_summary(trial)
    if breakdown is not None:
        data["breakdown"] = breakdown
    metrics = anomaly_metrics(bag, safety) if bag.gt_anomaly else None
    if metrics is not None:
        data["anomaly"] = metrics
    return ReplayReport(data, trial, overlays)


def outputs_label(options: ReplayOptions) -> str | list[str]:
    """The outputs subscribed to, as T.json and N.json record them."""
    return "all" if options.outputs is None else sorted(options.outputs | {"safety"})


#: Environment variables that choose and configure the middleware's transports.
MIDDLEWARE_ENV = (
    "RMW_IMPLEMENTATION",
    "FASTDDS_BUILTIN_TRANSPORTS",
    "FASTDDS_DEFAULT_PROFILES_FILE",
    "FASTRTPS_DEFAULT_PROFILES_FILE",
    "ROS_LOCALHOST_ONLY",
    "ROS_AUTOMATIC_DISCOVERY_RANGE",
)


def delivery_label(options: ReplayOptions) -> dict[str, Any]:
    """How outputs reached the collector, as T.json and N.json record it: in this process
    (intra-process) or from the node's own process, and the middleware settings in force."""
    env = {k: os.environ[k] for k in MIDDLEWARE_ENV if k in os.environ}
    return {"node_process": options.node_process, "environment": env}


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def write_report(report: ReplayReport, out: Path, title: str) -> Path:
    """Write T.json to ``out`` and the latency plot beside it; the plot's path."""
    from segmentation_safety.commands.common import write_json

    write_json(out, report.data)
    plot = out.with_name(f"{out.stem}_latency.png")
    plot_latency(report.trial, plot, title, report.data.get("breakdown"))
    return plot


def format_breakdown(b: dict) -> str:
    """One line per stage (mean ms, share of the mean end-to-end) and the node overhead."""
    stages = b["stages_ms"]
    total = stages["end_to_end"]["mean"]
    parts = [f"{k} {stages[k]['mean']:.1f}" for k in BREAKDOWN_STAGES]
    o = b["node_overhead"]
    return (
        f"mean ms per frame over {b['frames']} frames (end-to-end {total:.1f}): "
        + ", ".join(parts)
        + f"\nnode overhead (end-to-end - network - detectors): {o['ms_mean']:.1f} ms mean, "
        f"{100 * o['fraction_of_mean']:.1f}% of the mean latency "
        f"(per-frame p50 {o['ms_p50']:.1f} ms, {100 * o['fraction_p50']:.1f}%); without "
        f"waiting for the worker (queue) {o['ms_mean_without_queue']:.1f} ms, per-frame p50 "
        f"{100 * o['fraction_p50_without_queue']:.1f}%" + _verdict(o)
    )


def _verdict(o: dict) -> str:
    if "within_budget" not in o:  # a T.json from before the verdict
        return ""
    # "above", not "OVER": make demo's small frames are above it by design, and the
    # budget's own size is what `bench --node` measures.
    word = "within" if o["within_budget"] else "above"
    return (
        f"\nnode's own work {100 * o['fraction_of_mean_without_queue']:.1f}% of the frame: "
        f"{word} the {100 * o['budget_fraction']:.0f}% budget DESIGN §7 sets for 512x1024 "
        "frames (fixed costs weigh more on smaller frames, per-pixel ones on larger; `segsafe "
        "bench --node` measures at that size)"
    )
