"""`segsafe bench`: segmentation time and each detector's overhead, in one run.

With --node: the real detector node instead, fed the bag's frames resized to each of
--sizes (and each --output-scales), all variants interleaved in one run, one frame in
flight; writes the latency by stage and the node overhead (end-to-end minus network and
detectors) per variant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segmentation_safety.commands.common import (
    add_models_arg,
    need_ros,
    parse_detector_options,
    parse_detectors,
    write_json,
)
from segmentation_safety.commands.replay import add_node_process_arg
from segmentation_safety.errors import InvalidArgumentError, check_writable, report_user_errors


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time the segmentation pass and each detector's overhead (writes B.json)",
        description=__doc__.replace("``", "`"),
    )
    p.add_argument("--height", type=int, default=512, help="image height timed (default 512)")
    p.add_argument("--width", type=int, default=1024, help="image width timed (default 1024)")
    add_models_arg(p)
    p.add_argument("--detectors", default="all", help="comma-separated names, or 'all'")
    p.add_argument(
        "--segmenter",
        default=None,
        help="time this architecture (random weights) instead of the bundle's segmenter, "
        "e.g. espnetv2, lraspp_mobilenet_v3",
    )
    p.add_argument(
        "--detector-options",
        default=None,
        help='JSON of per-detector options, e.g. \'{"resynthesis": {"synthesis_scale": 0.5}}\'',
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--fp32", action="store_true", help="on CUDA, time fp32 instead of fp16 autocast"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=10,
        help="timed passes, median reported (default: %(default)s)",
    )
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed passes first (default: %(default)s)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, required=True, help="B.json to write")
    node = p.add_argument_group("--node: the whole node (replay machinery), not the models")
    node.add_argument("--node", action="store_true", help="time the node's stages")
    node.add_argument("--bag", type=Path, default=None, help="rosbag2 whose frames are used")
    node.add_argument("--sizes", default="512x1024,1024x2048", help="HEIGHTxWIDTH,...")
    node.add_argument("--output-scales", default="1", help="output_scale values, e.g. 1,0.5")
    node.add_argument(
        "--inputs",
        default="raw",
        help="how the camera sends frames: raw (rgb8 Images), jpeg (CompressedImages at "
        "quality 90, the node reading image/compressed), or both: raw,jpeg",
    )
    node.add_argument("--frames", type=int, default=10, help="frames per variant")
    node.add_argument("--config", type=Path, default=None, help="node parameters YAML")
    node.add_argument(
        "--outputs", default="all", help="outputs to subscribe to (safety always), or 'all'"
    )
    node.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="node parameter"
    )
    add_node_process_arg(node)
    p.set_defaults(run=run)


def run_node(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    need_ros("bench --node")
    from segmentation_safety.commands.replay import parse_params
    from segmentation_safety.ros.detector_node import TOPICS
    from segmentation_safety.ros.node_bench import (
        Variant,
        format_node_table,
        node_bench,
        parse_inputs,
        parse_sizes,
        turns_note,
    )
    from segmentation_safety.ros.replay import ReplayOptions

    if args.bag is None:
        raise InvalidArgumentError("--node needs --bag (e.g. from `segsafe make-bag`)")
    if args.frames < 1:
        raise InvalidArgumentError("--frames must be at least 1")
    if args.threads and args.node_process:
        raise InvalidArgumentError(
            "--threads sets this process's torch threads, not a --node-process node's"
        )
    if args.threads:  # the nodes run in this process
        import torch

        torch.set_num_threads(args.threads)
    try:
        sizes = parse_sizes(args.sizes)
        scales = [float(x) for x in args.output_scales.split(",")]
        sent = parse_inputs(args.inputs)
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from None
    parameters = parse_params(args.param)
    outputs = None
    if args.outputs.strip() != "all":
        outputs = frozenset(o.strip() for o in args.outputs.split(",") if o.strip())
        if outputs - set(TOPICS):
            raise InvalidArgumentError(f"--outputs: unknown {sorted(outputs - set(TOPICS))}")
    if args.device != "auto":
        parameters.setdefault("device", args.device)
    options = ReplayOptions(
        models_dir=args.models,
        config=args.config,
        outputs=outputs,
        parameters=parameters,
        node_process=args.node_process,
    )
    variants = [Variant(h, w, s, i) for h, w in sizes for s in scales for i in sent]
    bar = tqdm(total=args.frames, desc="bench --node", unit="round", file=sys.stderr)
    try:
        report = node_bench(
            args.bag, variants, options, rounds=args.frames,
            progress=lambda i, n: bar.update(i - bar.n),
        )  # fmt: skip
    finally:
        bar.close()
    write_json(args.out, report)
    where = "its own process" if args.node_process else "this process"
    print(
        f"node latency by stage, mean ms per frame ({args.frames} frames per variant, "
        f"one in flight, interleaved; outputs {report['outputs']}; the node in {where}):"
    )
    print(format_node_table(report))
    note = turns_note(args.node_process, len(variants))
    if note:
        print(note)
    print(f"wrote {args.out}")
    return 0


@report_user_errors("bench")
def run(args: argparse.Namespace) -> int:
    check_writable(args.out)  # before minutes of timing, not after
    if args.threads is not None and args.threads < 1:
        raise InvalidArgumentError("--threads must be at least 1")
    if args.node:
        return run_node(args)
    import torch
    from tqdm import tqdm

    from segmentation_safety.bench import bench
    from segmentation_safety.checkpoint import BundleError
    from segmentation_safety.detectors import registry
    from segmentation_safety.device import resolve_device
    from segmentation_safety.host_memory import retain_freed_memory
    from segmentation_safety.models.zoo import build_segmenter, load_segmenter
    from segmentation_safety.pipeline import DEMO_MODELS, load_parts, part_path

    if args.height < 16 or args.width < 16:
        raise InvalidArgumentError("--height and --width must be at least 16")
    if args.repeats < 1 or args.warmup < 0:
        raise InvalidArgumentError("--repeats must be at least 1 and --warmup at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Time the allocator the node runs with (its retain_host_memory default).
    retained = retain_freed_memory()
    device = resolve_device(args.device)
    names = parse_detectors(args.detectors)
    options = parse_detector_options(args.detector_options)
    root = args.models or DEMO_MODELS
    if args.segmenter:
        try:
            segmenter = build_segmenter(args.segmenter)
        except KeyError as e:  # names the known architectures
            raise InvalidArgumentError(f"--segmenter: {e.args[0]}") from None
        seg_name = f"{args.segmenter} (random weights)"
        parts_usable = False  # trained parts belong to another segmenter
    else:
        segmenter, bundle = load_segmenter(part_path(root, "segmenter"))
        seg_name = bundle.metadata.get("architecture", {}).get("name", "segmenter")
        parts_usable = True
        trained = bundle.metadata.get("input_size")
        if trained and list(trained) != [args.height, args.width]:
            # What the model bench times is the network at --height x --width; the node
            # resizes every frame to the bundle's size first (input_size [0, 0]).
            print(
                f"note: the node runs this segmenter at its bundle's {trained[0]}x{trained[1]} "
                f"whatever the frame size; this bench times it at {args.height}x{args.width} "
                f"(--height {trained[0]} --width {trained[1]} times what the node runs)",
                file=sys.stderr,
            )
    detectors, untrained, skipped = {}, [], {}
    for name in names:
        try:
            det = registry.build(name, segmenter, **options.get(name, {}))
        except ValueError as e:  # e.g. MC dropout on a segmenter without dropout
            if args.detectors != "all":
                raise
            skipped[name] = str(e)
            print(f"skipping {name}: {e}", file=sys.stderr)
            continue
        present = all(part_path(root, k).is_file() for k in det.trained_parts)
        if parts_usable and present:
            try:
                load_parts(det, root)
            except BundleError as e:
                print(f"warning: {e}; timing untrained weights", file=sys.stderr)
                untrained.append(name)
        elif det.trained_parts:
            untrained.append(name)
        detectors[name] = det
    bar = tqdm(total=args.warmup + args.repeats, desc="bench", unit="round", file=sys.stderr)

    def step(i: int, total: int) -> None:
        bar.update(i - bar.n)

    report = bench(
        segmenter,
        detectors,
        args.height,
        args.width,
        device,
        repeats=args.repeats,
        warmup=args.warmup,
        untrained=untrained,
        segmenter_name=seg_name,
        progress=step,
        half=not args.fp32,
    )
    bar.close()
    report.skipped = skipped
    report.host_memory_retained = retained
    write_json(args.out, report.to_json())
    print(format_table(report))
    print(f"wrote {args.out}")
    return 0


def format_table(report: object) -> str:
    """A Markdown table of a BenchReport."""
    r = report
    lines = [
        f"segmenter {r.segmenter} on {r.device}{' (fp16 autocast)' if r.half else ''} "
        f"at {r.height}x{r.width}: "
        f"{r.segmentation_ms:.1f} ms per frame (median of {r.repeats})",
        "",
        "| detector | added ms | overhead | budget | note |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for n, t in r.detectors.items():
        budget = "-" if t.budget is None else f"{100 * t.budget:.0f}%"
        if t.within_budget is False:
            budget += " **over**"
        lines.append(f"| {n} | {t.ms:.2f} | {100 * t.overhead:.1f}% | {budget} | {t.note} |")
    for n, why in r.skipped.items():
        lines.append(f"| {n} | - | - | - | skipped: {why} |")
    return "\n".join(lines)
