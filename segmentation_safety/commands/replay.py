"""`segsafe replay`: play a rosbag2 through the real detector node; write T.json + a plot.

Images are published at the bag's timing divided by --rate; latency is measured on a
monotonic clock from publish to receipt of the node's `safety` output (matched by header
stamp). T.json: frames_sent, frames_processed, frames_dropped (skipped by the node for a
newer frame), frames_rejected (refused as bad input or failed in the node), rate_hz,
latency_ms {p50, p95, p99, max}, plus anomaly metrics where the bag has ground truth and the rate
search with --find-max-rate. `breakdown` splits the latency by stage from the node's
SafetyFrame timings (transport_in, dispatch, queue, decode, preprocess, segmenter,
detectors, postprocess, publish, other, transport_out, and subscriber: the delivered
answer's wait for the replay's callback; mean and p50 in ms) and gives the node overhead
(end-to-end minus network and detectors) in ms and as a fraction. The latency
plot, with the breakdown, is written beside it (T_latency.png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from segmentation_safety.commands.common import add_models_arg, need_ros
from segmentation_safety.errors import InvalidArgumentError, check_writable, report_user_errors


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="replay a rosbag2 through the detector node (timing report T.json + plot)",
        description=__doc__.replace("``", "`"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bag", type=Path, required=True, help="rosbag2 directory (sqlite3 or mcap)")
    add_models_arg(p)
    p.add_argument(
        "--rate",
        type=float,
        default=1.0,
        help="playback speed factor (2 = twice; default: %(default)s)",
    )
    p.add_argument("--config", type=Path, default=None, help="node parameters YAML")
    p.add_argument("--device", default=None, help="override the node's device parameter")
    p.add_argument("--topic", default=None, help="camera image topic (default: found in the bag)")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="replay only the bag's first N frames (its frames are held in memory, at most "
        "half of what the machine has available)",
    )
    p.add_argument("--out", type=Path, required=True, help="T.json to write")
    p.add_argument(
        "--find-max-rate",
        action="store_true",
        help="also search the highest input rate with < 5%% drops (ros2_benchmark style)",
    )
    p.add_argument("--search-seconds", type=float, default=3.0, help="length of each rate trial")
    p.add_argument("--search-trials", type=int, default=8, help="at most this many rate trials")
    p.add_argument(
        "--drain",
        type=float,
        default=3.0,
        help="seconds without a new answer before the rest count as not answered (at least "
        "3 times the node's time for a warm-up frame)",
    )
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed warm-up frames (default: %(default)s)"
    )
    p.add_argument(
        "--outputs",
        default="all",
        help="node outputs to subscribe to, comma-separated (safety always), or 'all'; the "
        "node skips work for outputs without subscribers",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="node parameter override (YAML value), e.g. output_scale=0.5; repeatable",
    )
    add_node_process_arg(p)
    p.add_argument("--output-bag", type=Path, default=None, help="record input + outputs here")
    p.add_argument(
        "--output-format",
        choices=("sqlite3", "mcap"),
        default="sqlite3",
        help="storage of --output-bag (default sqlite3)",
    )
    p.add_argument("--overlays", type=Path, default=None, help="save hazard overlays here")
    p.add_argument(
        "--overlay-count", type=int, default=4, help="how many overlay PNGs (default: %(default)s)"
    )
    p.set_defaults(run=run)


@report_user_errors("replay")
def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    need_ros("replay")
    from segmentation_safety.bags import OutputBag
    from segmentation_safety.ros.detector_node import TOPICS
    from segmentation_safety.ros.replay import ReplayOptions, replay
    from segmentation_safety.ros.replay_report import format_breakdown, save_overlays, write_report

    outputs = None
    if args.outputs.strip() != "all":
        outputs = frozenset(o.strip() for o in args.outputs.split(",") if o.strip())
        unknown = sorted(outputs - set(TOPICS))
        if unknown:
            raise InvalidArgumentError(f"--outputs: unknown {unknown}; known: {', '.join(TOPICS)}")
        if args.overlays is not None:
            outputs |= {"hazard_overlay"}
    check_writable(args.out)  # before the replay, not after it
    if args.overlays is not None:
        check_writable(args.overlays, "--overlays", folder=True)
    if args.output_bag is not None:
        OutputBag.check_new(args.output_bag)  # before the node starts, not after
    if args.warmup < 0 or args.overlay_count < 0 or args.search_trials < 1:
        raise InvalidArgumentError(
            "--warmup and --overlay-count must be at least 0, --search-trials at least 1"
        )
    parameters = parse_params(args.param)
    options = ReplayOptions(
        parameters=parameters,
        outputs=outputs,
        models_dir=args.models,
        config=args.config,
        device=args.device,
        rate=args.rate,
        warmup=args.warmup,
        drain_s=args.drain,
        find_max_rate=args.find_max_rate,
        search_seconds=args.search_seconds,
        search_trials=args.search_trials,
        output_bag=args.output_bag,
        output_format=args.output_format,
        node_process=args.node_process,
        keep_overlays=args.overlays is not None and args.overlay_count > 0,
        limit=args.limit,
    )
    print(f"replaying {args.bag} through the detector node ...", file=sys.stderr)
    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        unit = "frame" if stage == "replay" else "trial"
        if stage not in bars:  # one bar a stage (a default argument would be built each call)
            bars[stage] = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr)
        bar = bars[stage]
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    options.progress = progress
    try:
        report = replay(args.bag, options, args.topic)
    finally:
        for bar in bars.values():
            bar.close()
    d = report.data
    title = f"{args.bag.name}: {d['frames_processed']}/{d['frames_sent']} frames answered"
    plot = write_report(report, args.out, title)
    lat = d["latency_ms"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    print(
        f"frames sent {d['frames_sent']}, processed {d['frames_processed']}, dropped "
        f"{d['frames_dropped']}, refused or failed {d['frames_rejected']}; latency ms "
        f"p50 {fmt(lat['p50'])} p95 {fmt(lat['p95'])} p99 {fmt(lat['p99'])} "
        f"max {fmt(lat['max'])}"
    )
    if "breakdown" in d:
        print(format_breakdown(d["breakdown"]))
    if "max_rate_hz" in d:
        print(f"max input rate with < 5% drops: {fmt(d['max_rate_hz'])} Hz")
    if "anomaly" in d:
        a = d["anomaly"]
        pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
        print(
            f"anomaly ({a['detector']}, {a['frames']} frames): AP {pct(a['ap'])} "
            f"AUROC {pct(a['auroc'])} FPR95 {pct(a['fpr95'])}"
        )
    if args.overlays is not None:
        saved = save_overlays(report.overlays, args.overlays, args.overlay_count)
        print(f"wrote {len(saved)} overlay images to {args.overlays}")
    print(f"wrote {args.out} and {plot}")
    if args.output_bag is not None:
        print(f"wrote {args.output_bag}")
    return 0


def add_node_process_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--node-process",
        action="store_true",
        help="run the node in a process of its own, as deployed: its outputs then cross "
        "the DDS transport the environment configures (e.g. FASTDDS_BUILTIN_TRANSPORTS) "
        "instead of rclpy's in-process delivery",
    )


def parse_params(items: list[str]) -> dict[str, object]:
    """``NAME=VALUE`` strings -> {name: value}, values read as YAML (1.0, true, [0, 1])."""
    import yaml

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InvalidArgumentError(f"--param: expected NAME=VALUE, got {item!r}")
        out[name.strip()] = yaml.safe_load(value)
    from segmentation_safety.ros.params import is_node_parameter

    # A misspelt name would be declared by nobody and silently change nothing.
    unknown = sorted(name for name in out if not is_node_parameter(name))
    if unknown:
        raise InvalidArgumentError(
            f"--param: {', '.join(unknown)} is not a parameter of the node "
            "(README's parameter list; config/detector.yaml has them all)"
        )
    return out
