"""The node's per-frame work after the network, before (host) and after (device) issue 14.

Old path, as detector_node did it until issue 14: every class of the logits upsampled
for the argmax, maps and labels copied to the host, then on the host colours,
overlay, the alarm, and each Image built through rclpy (``bytes`` -> message), the
SafetyFrame embedding them again and serialised by rclpy. New path:
``Pipeline.process_frame`` and the CDR bodies, serialised once. Both on the same frames,
interleaved frame by frame, in one process; no DDS (the replay measures that).

    python -P scripts/compare_node_paths.py --bag BAG --sizes 512x1024,1024x2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def main() -> None:
    from rclpy.serialization import deserialize_message, serialize_message
    from segmentation_safety.msg import SafetyFrame
    from sensor_msgs.msg import Image

    from segmentation_safety import visualize
    from segmentation_safety.bags import read_bag
    from segmentation_safety.pipeline import DEMO_MODELS, Pipeline, PipelineConfig, resize_map
    from segmentation_safety.ros import cdr, image_codec
    from segmentation_safety.ros.detector_node import SAFETY_EMBEDS, DetectorNode
    from segmentation_safety.ros.node_bench import frames_at, parse_sizes
    from segmentation_safety.types import RenderOptions

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bag", required=True)
    ap.add_argument("--sizes", default="512x1024,1024x2048")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=-7.1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:  # one thread: steadier on a shared machine
        torch.set_num_threads(args.threads)
    config = PipelineConfig(anomaly="densehybrid", failure="max_softmax", device="cpu")
    pipe = Pipeline.from_models_dir(DEMO_MODELS, config)
    bag = read_bag(args.bag)
    every = RenderOptions(
        labels=True,
        color=True,
        overlay=True,
        alarm=(0,),
        maps=frozenset({"anomaly", "failure"}),
        threshold=args.threshold,
    )
    outputs = {"anomaly", "failure", "class_iou"}

    def old(rgb: np.ndarray, header: object) -> tuple[float, float]:
        x = pipe.to_input(rgb)
        size = tuple(x.shape[-2:])
        seg, outs, timings = pipe.run(x, ["densehybrid", "max_softmax"])
        t0 = time.perf_counter()
        with torch.inference_mode():
            labels = resize_map(seg.logits.float(), size).argmax(1).to(torch.uint8)[0].numpy()
            anomaly, failure = (
                resize_map(m.float().unsqueeze(1), size)[0, 0].numpy()
                for m in (outs["densehybrid"].anomaly, outs["max_softmax"].failure)
            )
        overlay = visualize.hazard_overlay(rgb, anomaly, args.threshold)
        msgs = [
            image_codec.encode_mono8(labels, header),
            image_codec.encode_rgb8(visualize.colorize_labels(labels), header),
            image_codec.encode_rgb8(overlay, header),
            image_codec.encode_32fc1(anomaly, header),
            image_codec.encode_32fc1(failure, header),
        ]
        frame = SafetyFrame(header=header, segmentation=msgs[0], anomaly=msgs[3], failure=msgs[4])
        area = np.isin(labels, (0,))  # the alarm as the node counted it on the host
        scores = anomaly[area]
        frame.alarm.anomalous_pixels = int(np.count_nonzero(~(scores <= args.threshold)))
        finite = scores[np.isfinite(scores)]
        frame.alarm.max_score = float(finite.max()) if finite.size else float("nan")
        frame.alarm.mean_failure = float(np.nanmean(failure))
        for m in [*msgs, frame]:
            serialize_message(m)
        return (time.perf_counter() - t0) * 1e3, timings["segmenter"]

    def new(rgb: np.ndarray, header: object) -> tuple[float, float]:
        r = pipe.process_frame(rgb, outputs, every)
        t0 = time.perf_counter()
        bodies = DetectorNode._image_bodies(r, header)
        for body in bodies.values():
            cdr.serialize_body(body)
        frame = SafetyFrame(header=header)
        embedded = {to: bodies[k] for k, to in SAFETY_EMBEDS.items()}
        cdr.serialize(frame, embedded)
        return r.timings_ms["postprocess"] + (time.perf_counter() - t0) * 1e3, r.timings_ms[
            "segmenter"
        ]

    print("| frame | old ms | new ms | old / segmenter | new / segmenter |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for h, w in parse_sizes(args.sizes):
        msgs = [deserialize_message(raw, Image) for raw in frames_at(bag, h, w, 3)]
        times: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
        for i in range(args.frames + 1):
            msg = msgs[i % len(msgs)]
            rgb = image_codec.decode_rgb(msg)
            for name, path in (("old", old), ("new", new)):
                ms = path(rgb, msg.header)
                if i:  # the first round warms up
                    times[name].append(ms)
        med = {k: statistics.median(t for t, _ in v) for k, v in times.items()}
        seg = {k: statistics.median(s for _, s in v) for k, v in times.items()}
        share = {k: 100 * med[k] / seg[k] for k in med}
        print(f"| {h}x{w} | {med['old']:.1f} | {med['new']:.1f} | "
              f"{share['old']:.1f}% | {share['new']:.1f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
