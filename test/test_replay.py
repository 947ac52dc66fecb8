"""`segsafe replay`: a tiny bag through the real detector node, over real rclpy."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2 Kilted wheels) is not installed")
pytest.importorskip("rosbags", reason="rosbags is not installed")
if "segmentation_safety" not in os.environ.get("AMENT_PREFIX_PATH", ""):
    pytest.skip("install space not sourced: run through `make test`", allow_module_level=True)

from test_bag_io import T0, write_stamped_bag  # noqa: E402
from test_bags import write_frames, write_mp4, write_world_sequence  # noqa: E402
from waiting import wait_for  # noqa: E402

from segmentation_safety.bags import BagError, cdr_stamp_ns, read_bag  # noqa: E402
from segmentation_safety.cli import main  # noqa: E402
from segmentation_safety.ros.replay_report import (  # noqa: E402
    BREAKDOWN_STAGES,
    frame_breakdown,
)
from training.bags import discover_sequences, write_bag  # noqa: E402

pytestmark = pytest.mark.ros
FRAMES = 4


#: The default anomaly detector (densehybrid) needs a bundle the tiny test models lack.
PARAMS = '/**:\n  ros__parameters:\n    anomaly_detector: "max_softmax"\n'


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained TinySegmenter bundle: enough for the softmax detectors the node runs."""
    import torch

    from segmentation_safety.checkpoint import save_bundle
    from segmentation_safety.models.zoo import build_segmenter, segmenter_metadata
    from segmentation_safety.operating_point import OperatingPoint

    torch.manual_seed(0)
    seg = build_segmenter("tiny", num_classes=19, width=8)
    root = tmp_path_factory.mktemp("models")
    # max_softmax's operating point, as `segsafe calibrate` would store it.
    point = OperatingPoint(0.9, 0.01, (0,), "test", 1, 100).to_metadata()
    meta = {**segmenter_metadata(seg), "operating_points": {"max_softmax": point}}
    save_bundle(root / "segmenter.safetensors", seg.state_dict(), meta)
    return root


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("world")
    write_world_sequence(root, "seq_000", frames=FRAMES)
    seq = discover_sequences(root)["seq_000"]
    out = tmp_path_factory.mktemp("bags")
    return {fmt: write_bag(seq, out / fmt, storage=fmt).path for fmt in ("sqlite3", "mcap")}


def test_replay_through_the_node(
    bags: dict[str, Path], models: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    out = tmp_path / "T.json"
    out_bag = tmp_path / "out_bag"
    config = tmp_path / "params.yaml"
    config.write_text(PARAMS)
    rc = main([
        "replay", "--bag", str(bags["mcap"]), "--models", str(models), "--out", str(out),
        "--config", str(config),
        "--rate", "2", "--drain", "1.5", "--output-bag", str(out_bag),
        "--overlays", str(tmp_path / "overlays"), "--overlay-count", "2",
        "--find-max-rate", "--search-trials", "2", "--search-seconds", "0.5",
    ])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "replay: 100%|" in err and "rate search:" in err  # the long parts show progress
    assert err.count("replay:   0%|") <= 1  # one bar, not one a frame
    t = json.loads(out.read_text())
    for key in ("frames_sent", "frames_processed", "frames_dropped", "rate_hz", "latency_ms"):
        assert key in t
    assert set(t["latency_ms"]) >= {"p50", "p95", "p99", "max"}
    assert t["frames_sent"] == FRAMES
    assert t["frames_processed"] >= 1  # the node answers the newest frame at least
    lat = t["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert t["rate_hz"] > 0
    # The latency by stage, from the node's SafetyFrame timings, adds up to end-to-end.
    b = t["breakdown"]
    assert b["frames"] == t["frames_processed"]
    stages = b["stages_ms"]
    assert set(stages) == {*BREAKDOWN_STAGES, "end_to_end"}
    assert stages["segmenter"]["mean"] > 0 and stages["transport_in"]["mean"] > 0
    parts = sum(stages[k]["mean"] for k in BREAKDOWN_STAGES)
    assert abs(parts - stages["end_to_end"]["mean"]) < 1e-6 * parts + 1e-3
    o = b["node_overhead"]
    assert 0 < o["fraction_of_mean"] < 1 and 0 < o["ms_mean"] < stages["end_to_end"]["mean"]
    # The node's executor and the replay's, each from the middleware's delivery time.
    assert stages["dispatch"]["mean"] > 0 and stages["subscriber"]["mean"] > 0
    models_ms = stages["segmenter"]["mean"] + stages["detectors"]["mean"]
    assert o["ms_mean"] == pytest.approx(stages["end_to_end"]["mean"] - models_ms)
    assert 0 < o["ms_mean_without_queue"] <= o["ms_mean"]
    # The host part: the overhead less what runs on the pipeline's device.
    device = stages["preprocess"]["mean"] + stages["postprocess"]["mean"]
    assert o["host_ms_mean"] == pytest.approx(o["ms_mean"] - device)
    assert 0 < o["host_ms_mean"] < o["ms_mean"]
    # The bag carries ground-truth anomaly masks: metrics over the answered frames.
    assert t["anomaly"]["frames"] == t["frames_processed"]
    assert 0.0 <= t["anomaly"]["auroc"] <= 1.0
    assert 1 <= len(t["rate_search"]["trials"]) <= 2
    assert "max_rate_hz" in t
    assert (tmp_path / "T_latency.png").stat().st_size > 1000
    assert 1 <= len(list((tmp_path / "overlays").glob("*.png"))) <= 2

    from rosbags.rosbag2 import Reader

    with Reader(out_bag) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
        types = {c.topic: c.msgtype for c in reader.connections}
    assert counts["/camera/image_raw"] == FRAMES
    assert counts["/segmentation_safety/safety"] == t["frames_processed"]
    assert types["/segmentation_safety/safety"] == "segmentation_safety/msg/SafetyFrame"
    for topic in ("anomaly", "failure", "hazard_overlay", "segmentation", "hazards"):
        assert counts[f"/segmentation_safety/{topic}"] == t["frames_processed"], topic
    # The class names came once, before the recording began: the bag has them all the same.
    assert counts["/segmentation_safety/label_info"] == 1
    assert not list(tmp_path.glob(".*partial*"))
    # Each topic offers what its publisher did: `ros2 bag play` then latches label_info,
    # and a transient-local subscriber gets it (recorded volatile, it got nothing).
    from rosbags.interfaces import QosDurability, QosReliability

    with Reader(out_bag) as reader:
        offered = {c.topic: c.ext.offered_qos_profiles for c in reader.connections}
    assert all(len(q) == 1 for q in offered.values()), offered
    durability = {topic: q[0].durability for topic, q in offered.items()}
    assert durability.pop("/segmentation_safety/label_info") == QosDurability.TRANSIENT_LOCAL
    assert set(durability.values()) == {QosDurability.VOLATILE}
    assert {q[0].reliability for q in offered.values()} == {QosReliability.RELIABLE}
    # The node's outputs offer its qos.output_depth (asked of the graph, not assumed).
    assert offered["/segmentation_safety/safety"][0].depth == 4
    assert offered["/segmentation_safety/anomaly"][0].depth == 4


# -- drops and latency against a known schedule -------------------------------------------
# Counts that follow from the schedule alone, whatever the load: a frame is dropped only
# when a newer one replaced it in the node's one-frame slot.
def _schedule_bag(tmp_path: Path, frames: int) -> Path:
    """``frames`` images 0.1 s apart (10 Hz)."""
    write_world_sequence(tmp_path / "world", "seq_000", frames=frames)
    seq = discover_sequences(tmp_path / "world")["seq_000"]
    return write_bag(seq, tmp_path / "bag").path


def _replay_trial(bag: Path, models: Path, tmp_path: Path, **options):  # noqa: ANN202
    from segmentation_safety.ros.replay import ReplayOptions, replay

    config = tmp_path / "params.yaml"
    config.write_text(PARAMS)
    return replay(bag, ReplayOptions(models_dir=models, config=config, warmup=1, **options))


def test_a_node_slower_than_its_input_answers_only_the_newest_frames(models: Path, tmp_path: Path):
    # max_rate 0.25: 4 s between the node's frames; the 10 frames arrive within ~1 s,
    # so the worker can take at most one while they arrive and, after the last one,
    # takes the newest. Without dropping every frame would queue and be answered
    # (the 6 s drain outlasts the 4 s period).
    report = _replay_trial(
        _schedule_bag(tmp_path, 10), models, tmp_path, drain_s=6.0,
        parameters={"max_rate": 0.25},
    )  # fmt: skip
    trial, t = report.trial, report.data
    assert t["frames_sent"] == 10
    assert 1 <= t["frames_processed"] <= 2 and t["frames_dropped"] >= 8
    last = list(trial.sent)[-1]
    assert last in trial.answered  # the slot keeps the newest frame
    # Latency is receipt - publish of the same frame, for each answered frame only.
    latencies = [ms for _, ms in trial.latencies_ms()]
    assert len(latencies) == t["frames_processed"] and min(latencies) > 0
    assert t["latency_ms"]["max"] == pytest.approx(max(latencies))


def test_an_input_slower_than_the_node_loses_no_frame(models: Path, tmp_path: Path):
    # --rate 0.2: the 10 Hz bag at 2 Hz, 500 ms between frames, against a tiny network
    # on a 32x64 image: every frame is answered before the next arrives.
    report = _replay_trial(_schedule_bag(tmp_path, 5), models, tmp_path, rate=0.2)
    t, trial = report.data, report.trial
    assert (t["frames_sent"], t["frames_processed"], t["frames_dropped"]) == (5, 5, 0)
    assert set(trial.answered) == set(trial.sent)
    assert len(trial.latencies_ms()) == 5 and t["breakdown"]["frames"] == 5


def test_a_bag_whose_stamps_repeat_is_replayed_under_its_bag_times(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    # A driver leaving header.stamp at 0: the answers are matched to frames by stamp, so
    # the four frames were one (frames_sent 1) answered before it was sent (latency < 0).
    # --rate 0.2 as above: every frame is answered.
    times = [T0 + i * 100_000_000 for i in range(4)]
    bag = write_stamped_bag(tmp_path / "bag", times, [0] * 4)
    report = _replay_trial(bag, models, tmp_path, rate=0.2)
    t, trial = report.data, report.trial
    assert (t["frames_sent"], t["frames_processed"], t["frames_dropped"]) == (4, 4, 0)
    assert list(trial.sent) == times  # published under their bag times
    assert min(ms for _, ms in trial.latencies_ms()) > 0
    err = capsys.readouterr().err
    assert err.count("note: 3 of the 4 frames on /camera/image_raw repeat") == 1
    assert "bag receive time as header stamp" in err


def _with_refused_frames(bag: Path, refused: set[int]):  # noqa: ANN202
    """The bag's contents with the frames at ``refused`` replaced by ones the node refuses
    (an unsupported encoding), stamps and times kept."""
    from dataclasses import replace

    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image

    contents = read_bag(bag)
    for i in refused:
        frame = contents.frames[i]
        msg = deserialize_message(frame.raw, Image)
        msg.encoding = "nv21"  # not an input encoding: refused as bad input
        contents.frames[i] = replace(frame, raw=serialize_message(msg))
    return contents


def test_refused_frames_are_counted_apart_from_dropped_and_skipped_by_the_warm_up(
    models: Path, tmp_path: Path
):
    from segmentation_safety.ros.replay import Replayer, ReplayOptions

    config = tmp_path / "params.yaml"
    config.write_text(PARAMS)
    # The first frame is refused too: the warm-up must pass over it, not wait for an
    # answer that never comes. --rate 0.2 as above: no frame is dropped.
    contents = _with_refused_frames(_schedule_bag(tmp_path, 5), {0, 2})
    options = ReplayOptions(models_dir=models, config=config, warmup=1, rate=0.2,
                            parameters={"diagnostics_period": 0.2})  # fmt: skip
    with Replayer(contents, options) as r:
        r.warm_up()
        trial = r.replay_bag()
        # The replayer idles between trials by design: no "no frames" fault for that.
        assert r.node.params.input_timeout == 3600.0
    assert (trial.frames_sent, trial.frames_processed) == (5, 3)
    assert (trial.rejected, trial.frames_dropped) == (2, 0)


def test_the_drain_outlasts_a_frame_the_node_is_still_working_on(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import time

    from segmentation_safety.ros.detector_node import DetectorNode
    from segmentation_safety.ros.replay import Replayer, ReplayOptions

    handle = DetectorNode._handle

    def slow(self, *args):  # a node taking 1 s a frame, as a big frame on a loaded CPU
        time.sleep(1.0)
        return handle(self, *args)

    monkeypatch.setattr(DetectorNode, "_handle", slow)
    config = tmp_path / "params.yaml"
    config.write_text(PARAMS)
    # Two frames 0.1 s apart: the second waits a second for the worker. A 0.3 s drain
    # alone would give up before the first answer and count both as not answered.
    bag = read_bag(_schedule_bag(tmp_path, 2))
    with Replayer(bag, ReplayOptions(models_dir=models, config=config, warmup=1,
                                     drain_s=0.3)) as r:  # fmt: skip
        r.warm_up()
        trial = r.replay_bag()
    assert r.frame_s >= 1.0
    assert trial.frames_processed == 2


def test_a_bag_the_node_refuses_throughout_is_named_at_the_warm_up(models: Path, tmp_path: Path):
    from segmentation_safety.ros.replay import Replayer, ReplayError, ReplayOptions

    config = tmp_path / "params.yaml"
    config.write_text(PARAMS)
    contents = _with_refused_frames(_schedule_bag(tmp_path, 3), {0, 1, 2})
    options = ReplayOptions(models_dir=models, config=config, warmup=1,
                            parameters={"diagnostics_period": 0.2})  # fmt: skip
    with Replayer(contents, options) as r, pytest.raises(ReplayError) as e:
        r.warm_up()
    assert "refused the bag's first 3 frame(s) on /camera/image_raw" in str(e.value)
    assert "unsupported encoding 'nv21'" in str(e.value)  # the node's own words


def test_bench_node_names_a_frame_it_cannot_read_and_reads_only_the_frames_it_uses(
    tmp_path: Path,
):
    from segmentation_safety.ros.node_bench import resized_frames

    bag = _schedule_bag(tmp_path, 6)
    first = read_bag(bag, max_frames=2)
    assert len(first.frames) == 2 and first.camera_info  # a long recording is not loaded
    assert [f.raw for f in first.frames] == [f.raw for f in read_bag(bag).frames[:2]]
    contents = _with_refused_frames(bag, {1})
    with pytest.raises(
        BagError, match=r"frame 1 on /camera/image_raw .*unsupported encoding 'nv21'"
    ):
        resized_frames(contents, 32, 64, 3)  # a traceback before


@pytest.mark.parametrize("fmt", ["sqlite3", "mcap"])
def test_truncated_bag_is_a_clear_error(
    bags: dict[str, Path], tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture
):
    import shutil

    bag = tmp_path / "cut"
    shutil.copytree(bags[fmt], bag)
    (data,) = [p for p in bag.iterdir() if p.name != "metadata.yaml"]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    with pytest.raises(BagError, match="cannot read bag"):
        read_bag(bag)
    assert main(["replay", "--bag", str(bag), "--out", str(tmp_path / "T.json")]) == 2
    assert "cannot read bag" in capsys.readouterr().err
    assert not (tmp_path / "T.json").exists()


def test_a_bag_rosbags_cannot_read_is_named_in_one_line(bags: dict[str, Path], tmp_path: Path):
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(bags["mcap"], foreign)
    meta = foreign / "metadata.yaml"
    meta.write_text(meta.read_text().replace("storage_identifier: mcap", "storage_identifier: foo"))
    with pytest.raises(BagError) as e:
        read_bag(foreign)
    # Of a kind rosbags does not read, not damaged; rosbags' "please report issue" left out.
    assert str(e.value).endswith("Storage plugin 'foo' not supported"), e.value
    meta.write_text("rosbag2_bagfile_information: [unclosed\n")
    with pytest.raises(BagError, match=r"Could not load YAML .* \(truncated or corrupt\?\)$") as e:
        read_bag(foreign)
    assert "\n" not in str(e.value)  # one line, not PyYAML's caret drawing


def test_missing_bag_and_models(bags: dict[str, Path], tmp_path: Path, capsys):
    assert main(["replay", "--bag", str(tmp_path / "nope"), "--out", str(tmp_path / "T.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    taken = tmp_path / "taken.png"  # refused before the replay, not after it (a traceback)
    taken.write_bytes(b"x")
    rc = main(["replay", "--bag", str(bags["sqlite3"]), "--overlays", str(taken),
               "--out", str(tmp_path / "T.json")])  # fmt: skip
    assert rc == 2 and f"--overlays {taken} is a file; give a folder" in capsys.readouterr().err
    assert not (tmp_path / "T.json").exists()
    rc = main(["replay", "--bag", str(bags["sqlite3"]), "--models", str(tmp_path / "none"),
               "--out", str(tmp_path / "T.json")])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot start" in err and "segmenter.safetensors" in err
    (tmp_path / "out_bag").mkdir()
    rc = main(["replay", "--bag", str(bags["sqlite3"]), "--models", str(tmp_path / "none"),
               "--out", str(tmp_path / "T.json"),
               "--output-bag", str(tmp_path / "out_bag")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--output-bag" in err and "exists already" in err
    assert "cannot start" not in err  # refused before any node was started


# -- bags made from frame folders and videos --------------------------------------------
def _replay(bag: Path, models: Path, out_dir: Path, *extra: str) -> dict:
    out = out_dir / "T.json"
    config = out_dir / "params.yaml"
    config.write_text(PARAMS)
    rc = main(["replay", "--bag", str(bag), "--models", str(models), "--out", str(out),
               "--config", str(config), "--drain", "1.5", "--warmup", "1", *extra])  # fmt: skip
    assert rc == 0
    t = json.loads(out.read_text())
    assert t["frames_processed"] >= 1  # the node answers the newest frame at least
    return t


def test_limit_replays_the_first_frames_and_a_bag_too_big_for_memory_says_so(
    bags: dict[str, Path], models: Path, tmp_path: Path, capsys, monkeypatch
):
    t = _replay(bags["sqlite3"], models, tmp_path, "--limit", "2")
    assert t["frames_sent"] == 2 < FRAMES
    assert t["anomaly"]["frames"] == t["frames_processed"]  # the last one's ground truth too
    out = tmp_path / "T2.json"
    args = ["replay", "--bag", str(bags["sqlite3"]), "--out", str(out)]
    assert main([*args, "--limit", "0"]) == 2
    assert "--limit must be at least 1, got 0" in capsys.readouterr().err
    # The frames are held in memory: a bag over half of what is available is refused
    # before the node starts, naming the way out.
    from segmentation_safety import host_memory

    monkeypatch.setattr(host_memory, "available_bytes", lambda: 2000)  # under one frame
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(bags["sqlite3"]) in err and "replay --limit N" in err
    assert not out.exists()


def test_compressed_bag_from_a_frames_folder_replays(models: Path, tmp_path: Path):
    from rosbags.rosbag2 import Reader

    write_frames(tmp_path / "frames", 4, ".jpg")
    bag = tmp_path / "bag"
    assert main(["make-bag", "--frames", str(tmp_path / "frames"), "--out", str(bag),
                 "--compressed"]) == 0  # fmt: skip
    assert read_bag(bag).compressed
    out_bag = tmp_path / "out_bag"
    t = _replay(bag, models, tmp_path, "--output-bag", str(out_bag))
    assert t["image_topic"] == "/camera/image_raw/compressed" and t["frames_sent"] == 4
    with Reader(out_bag) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
        types = {c.topic: c.msgtype for c in reader.connections}
    assert types["/camera/image_raw/compressed"] == "sensor_msgs/msg/CompressedImage"
    assert counts["/camera/image_raw/compressed"] == 4 and counts["/camera/camera_info"] == 4
    for topic in ("safety", "segmentation", "hazard_overlay", "hazard_overlay/compressed"):
        assert counts[f"/segmentation_safety/{topic}"] == t["frames_processed"], topic


def test_the_warm_up_frames_outputs_stay_out_of_the_output_bag(
    bags: dict[str, Path], models: Path, tmp_path: Path, monkeypatch
):
    # `safety` is taken before a frame's other outputs, so the warm-up's answer can start
    # the recording while its other outputs are still to be taken. The first output taken
    # after that answer waits here for the recording to start: unless the replay waits
    # for those outputs first, it then records a warm-up output, every time.
    from rosbags.rosbag2 import Reader

    from segmentation_safety.ros.replay import Collector

    plain, plain_start = Collector._callback, Collector.write_label_info
    recording, waited = threading.Event(), threading.Event()

    def start(self):
        recording.set()
        plain_start(self)

    def waiting_outputs(self, key, name, msg_type):
        callback = plain(self, key, name, msg_type)
        if key in ("safety", "diagnostics"):
            return callback

        def after_waiting(raw):
            if self.answers and not self.keep_enabled and not waited.is_set():
                waited.set()
                recording.wait(timeout=0.5)
            callback(raw)

        return after_waiting

    monkeypatch.setattr(Collector, "write_label_info", start)
    monkeypatch.setattr(Collector, "_callback", waiting_outputs)
    out_bag = tmp_path / "out_bag"
    t = _replay(bags["sqlite3"], models, tmp_path, "--output-bag", str(out_bag))
    with Reader(out_bag) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
    for topic in ("safety", "segmentation", "anomaly"):
        assert counts[f"/segmentation_safety/{topic}"] == t["frames_processed"], topic
    assert waited.is_set()  # a warm-up output was taken after the warm-up's answer


def test_bag_from_an_mp4_replays(models: Path, tmp_path: Path):
    write_mp4(tmp_path / "clip.mp4", 5, fps=12.5)
    bag = tmp_path / "bag"
    assert main(["make-bag", "--video", str(tmp_path / "clip.mp4"), "--out", str(bag)]) == 0
    t = _replay(bag, models, tmp_path)
    assert t["image_topic"] == "/camera/image_raw" and t["frames_sent"] == 5
    assert t["bag_rate_hz"] == pytest.approx(12.5)


def test_real_road_anomaly_frames_replay_as_compressed_images(
    models: Path, tmp_path: Path, real_data: Path
):
    frames = real_data / "roadanomaly" / "frames"
    if not list(frames.glob("*.jpg")):
        pytest.skip(f"no Road Anomaly JPEGs under {frames}")
    bag = tmp_path / "bag"
    assert main(["make-bag", "--frames", str(frames), "--out", str(bag), "--compressed",
                 "--limit", "3", "--rate", "2"]) == 0  # fmt: skip
    t = _replay(bag, models, tmp_path, "--overlays", str(tmp_path / "overlays"))
    assert t["image_topic"] == "/camera/image_raw/compressed" and t["frames_sent"] == 3
    (overlay, *_) = sorted((tmp_path / "overlays").glob("*.png"))
    import cv2

    assert cv2.imread(str(overlay)).shape[:2] == (720, 1280)  # the real size, no downscale


def test_frame_breakdown_splits_the_latency_and_the_overhead():
    stages = {"transport_in": 2.0, "queue": 1.0, "decode": 0.5, "preprocess": 3.0,
              "segmenter": 80.0, "detector/a": 4.0, "detector/b": 6.0, "postprocess": 5.0,
              "publish": 2.0, "total": 101.0}  # fmt: skip
    b = frame_breakdown(110.0, stages)
    assert b["detectors"] == 10.0 and b["other"] == 0.5  # 101 - 100.5 named
    assert b["transport_out"] == 110.0 - 2.0 - 1.0 - 101.0
    assert sum(b[k] for k in BREAKDOWN_STAGES) == 110.0
    assert b["overhead"] == 20.0 and b["overhead_fraction"] == 20.0 / 110.0
    assert frame_breakdown(110.0, {"decode": 1.0}) is None  # no timings: no breakdown
    # The node's executor (dispatch) and the answer's wait for the subscriber's callback
    # are split out of transport_out, and both still count in the overhead.
    b = frame_breakdown(110.0, {**stages, "dispatch": 0.5, "subscriber": 3.0})
    assert b["transport_out"] == 110.0 - 2.0 - 0.5 - 1.0 - 101.0 - 3.0
    assert b["subscriber"] == 3.0 and b["dispatch"] == 0.5
    assert sum(b[k] for k in BREAKDOWN_STAGES) == 110.0
    assert b["overhead"] == 20.0 and b["overhead_fraction"] == 20.0 / 110.0
    # A subscriber wait longer than what is left after the node is clamped to it.
    b = frame_breakdown(110.0, {**stages, "subscriber": 50.0})
    assert b["subscriber"] == 6.0 and b["transport_out"] == 0.0


def test_latency_percentiles_and_trial_counts_by_hand():
    from segmentation_safety.ros.replay import Trial
    from segmentation_safety.ros.replay_report import latency_summary

    # 0, 1, ..., 100 ms in shuffled order: the k-th percentile is k ms exactly.
    values = [float((37 * i) % 101) for i in range(101)]
    assert sorted(values) == [float(i) for i in range(101)]
    got = latency_summary(values)
    assert got == {"p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0, "mean": 50.0}
    assert set(latency_summary([]).values()) == {None}  # nothing answered: JSON null
    # 5 frames sent 0.25 s apart (4 Hz); frames 2 and 4 answered 30 and 10 ms later,
    # one refused by the node: the other two were dropped.
    sent = {s: 10.0 + 0.25 * i for i, s in enumerate((1, 2, 3, 4, 5))}
    trial = Trial(sent, {4: sent[4] + 0.010, 2: sent[2] + 0.030}, rejected=1)
    assert (trial.frames_sent, trial.frames_processed, trial.frames_dropped) == (5, 2, 2)
    assert trial.drop_fraction == pytest.approx(2 / 5)
    assert trial.input_rate_hz() == pytest.approx(4.0)
    # In send order, timed from the first publish.
    assert trial.latencies_ms() == [
        (pytest.approx(0.25), pytest.approx(30.0)),
        (pytest.approx(0.75), pytest.approx(10.0)),
    ]
    assert math.isnan(Trial({1: 0.0}, {}).input_rate_hz())


def test_the_summary_judges_the_nodes_own_work_against_the_budget():
    from segmentation_safety.ros.replay import Trial
    from segmentation_safety.ros.replay_report import breakdown_summary, format_breakdown

    def summary(publish_ms: float, queue_ms: float) -> dict:
        stages = {"transport_in": 1.0, "queue": queue_ms, "decode": 1.0, "segmenter": 90.0,
                  "publish": publish_ms, "total": 91.0 + publish_ms}  # fmt: skip
        latency = 1.0 + queue_ms + stages["total"]  # nothing after the node
        trial = Trial({1: 0.0}, {1: latency / 1e3}, {1: stages})
        return breakdown_summary(trial)["node_overhead"]

    # Own work 1 + 1 + 5 = 7 ms of a 97 ms frame, whatever the frame waited for the worker.
    for queue in (0.0, 50.0):
        o = summary(5.0, queue)
        assert o["fraction_of_mean_without_queue"] == pytest.approx(7 / 97)
        assert o["within_budget"]
    over = summary(15.0, 0.0)  # 17 of 107 ms
    assert not over["within_budget"]
    text = format_breakdown(breakdown_summary(
        Trial({1: 0.0}, {1: 0.108}, {1: {"transport_in": 1.0, "decode": 1.0, "segmenter": 90.0,
                                         "publish": 15.0, "total": 106.0}})))  # fmt: skip
    assert "above the 10% budget DESIGN §7 sets for 512x1024 frames" in text


def test_the_overhead_summary_takes_medians_and_means_over_frames_by_hand():
    from segmentation_safety.ros.replay import Trial
    from segmentation_safety.ros.replay_report import breakdown_summary

    # Three frames, nothing outside the named stages; overhead = end-to-end - network.
    frames = [  # (latency ms, segmenter, detector, decode, publish, queue)
        (100.0, 85.0, 10.0, 2.0, 3.0, 0.0),  # overhead 5, fraction 0.05
        (50.0, 20.0, 10.0, 8.0, 12.0, 0.0),  # overhead 20, fraction 0.40
        (200.0, 150.0, 0.0, 10.0, 10.0, 30.0),  # overhead 50, fraction 0.25
    ]
    sent, answered, stages = {}, {}, {}
    for i, (lat, seg, det, dec, pub, queue) in enumerate(frames, 1):
        sent[i], answered[i] = float(i), i + lat / 1e3
        stages[i] = {"queue": queue, "decode": dec, "segmenter": seg, "detector/a": det,
                     "publish": pub, "total": dec + seg + det + pub}  # fmt: skip
    o = breakdown_summary(Trial(sent, answered, stages))["node_overhead"]
    assert o["ms_mean"] == pytest.approx(25.0) and o["ms_p50"] == pytest.approx(20.0)
    assert o["fraction_p50"] == pytest.approx(0.25)  # the median; the mean is 0.233
    assert o["fraction_of_mean"] == pytest.approx(25 / (350 / 3))
    # Without the queue: own work 5, 20, 20 of 100, 50, 170 ms.
    assert o["ms_mean_without_queue"] == pytest.approx(15.0)
    assert o["fraction_p50_without_queue"] == pytest.approx(20 / 170)
    assert o["fraction_of_mean_without_queue"] == pytest.approx(15 / (320 / 3))
    assert not o["within_budget"]  # 14% of the frame
    # The host stages (queue 10, decode 20/3, publish 25/3 on average) are the whole
    # overhead here: nothing ran pre- or post-processing on the device.
    assert o["host_ms_mean"] == pytest.approx(25.0)


def _bench_node(bag: Path, models: Path, tmp_path: Path, *options: str) -> dict:
    """`segsafe bench --node` on ``bag``, 2 frames a variant; its N.json."""
    out = tmp_path / "N.json"
    config = tmp_path / "params.yaml"
    config.write_text(PARAMS)
    rc = main(["bench", "--node", "--bag", str(bag), "--models", str(models),
               "--config", str(config), "--frames", "2", "--out", str(out), *options])  # fmt: skip
    assert rc == 0
    return json.loads(out.read_text())


def test_bench_node_times_every_size_and_scale_in_one_run(
    bags: dict[str, Path], models: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    n = _bench_node(bags["sqlite3"], models, tmp_path,
                    "--sizes", "32x64,48x96", "--output-scales", "1,0.5")  # fmt: skip
    assert list(n["variants"]) == [
        "32x64", "32x64 output_scale 0.5", "48x96", "48x96 output_scale 0.5"
    ]  # fmt: skip
    for v in n["variants"].values():
        assert v["frames_processed"] == v["frames_sent"] == 2  # one in flight: none dropped
        o = v["breakdown"]["node_overhead"]
        assert 0 < o["fraction_of_mean"] < 1
        # What the node said it ran, from its /diagnostics.
        assert v["node_said"]["device"] == "cpu" and "host" in v["node_said"]["jpeg_codec"]
    table = capsys.readouterr().out
    assert "| 48x96 output_scale 0.5 |" in table and "overhead % | host ms |" in table


def test_bench_node_says_when_node_processes_took_turns():
    from segmentation_safety.ros.node_bench import turns_note

    # Several variants, each a node process: their figures can hold each other's waits.
    note = turns_note(node_process=True, variants=2)
    assert note is not None and "one variant per run" in note and "2 variants" in note
    assert turns_note(node_process=True, variants=1) is None  # one camera's node
    assert turns_note(node_process=False, variants=4) is None  # one process, one thread


def test_bench_node_sends_jpeg_frames_to_a_node_reading_compressed_images(
    bags: dict[str, Path], models: Path, tmp_path: Path
):
    import numpy as np
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import CompressedImage, Image

    from segmentation_safety.ros import image_codec
    from segmentation_safety.ros.node_bench import frames_at, parse_inputs

    n = _bench_node(bags["sqlite3"], models, tmp_path, "--sizes", "32x64", "--inputs", "raw,jpeg")
    assert list(n["variants"]) == ["32x64", "32x64 jpeg"]
    # A node reading the other topic would answer nothing: every frame answered means
    # each node read the transport its frames came on.
    for name, sent in (("32x64", "raw"), ("32x64 jpeg", "jpeg")):
        v = n["variants"][name]
        assert v["input"] == sent and v["frames_processed"] == v["frames_sent"] == 2, name
    bag = read_bag(bags["sqlite3"])
    jpeg = deserialize_message(frames_at(bag, 32, 64, 1, "jpeg")[0], CompressedImage)
    raw = deserialize_message(frames_at(bag, 32, 64, 1)[0], Image)
    assert jpeg.format == "rgb8; jpeg compressed bgr8" and bytes(jpeg.data[:2]) == b"\xff\xd8"
    assert jpeg.header == raw.header
    # The same picture: jpeg keeps each channel's mean even where noise defeats it.
    np.testing.assert_allclose(image_codec.decode_compressed(jpeg).mean((0, 1)),
                               image_codec.decode_rgb(raw).mean((0, 1)), atol=4)  # fmt: skip
    with pytest.raises(ValueError, match="one or more of raw, jpeg"):
        parse_inputs("raw,png")


def test_replayers_of_one_process_never_share_a_namespace(bags: dict[str, Path]):
    from segmentation_safety.bags import read_bag
    from segmentation_safety.ros.replay import Replayer, ReplayOptions

    bag = read_bag(bags["sqlite3"])
    # Unstarted replayers: only their names are compared. Many at once, as bench --node
    # makes, so an id-derived name would collide now and then.
    names = {Replayer(bag, ReplayOptions()).namespace for _ in range(2000)}
    assert len(names) == 2000


def test_the_collector_takes_safety_before_the_outputs_published_before_it():
    """`safety` is the answer being timed: taken first of what one wait found, and the
    outputs it overtook are still kept once the collector is flushed."""
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from segmentation_safety.msg import SafetyFrame
    from sensor_msgs.msg import Image

    from segmentation_safety.ros.replay import Collector

    context = Context()
    rclpy.init(context=context, args=[])
    try:
        collector = Collector(context, "/flush_test", None, frozenset({"hazard_overlay"}))
        node = Node("fake_detector", namespace="/flush_test", context=context)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        overlay_pub = node.create_publisher(Image, "hazard_overlay", qos)
        safety_pub = node.create_publisher(SafetyFrame, "safety", qos)
        for pub in (overlay_pub, safety_pub):
            wait_for(lambda pub=pub: pub.get_subscription_count() > 0, "the collector")
        collector.keep_enabled = True
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(collector)
        overlay, safety = Image(height=1, width=1, encoding="rgb8", step=3), SafetyFrame()
        overlay.data = bytes(3)
        for msg in (overlay, safety):
            msg.header.stamp.sec = 7
        # The node's order: the other outputs, then `safety` (in one process both are in
        # the readers once published).
        overlay_pub.publish(overlay)
        safety_pub.publish(safety)
        executor.spin_once(timeout_sec=2.0)
        assert 7 * 10**9 in collector.answers
        assert 7 * 10**9 not in collector.keep["hazard_overlay"]
        spinning = threading.Thread(target=executor.spin, daemon=True)
        spinning.start()
        assert collector.flush(5.0)
        assert 7 * 10**9 in collector.keep["hazard_overlay"]
        executor.shutdown(timeout_sec=2.0)
        spinning.join(timeout=5.0)
        node.destroy_node()
        collector.destroy_node()
    finally:
        context.try_shutdown()


def test_a_kept_output_leaves_the_taken_buffer_to_the_next_take():
    """The replay keeps each frame's `safety` and overlay for its report: as copies. Held
    as taken, every kept buffer made the next frame's take fault fresh pages in, which
    delayed the next answer (`subscriber`, counted against the node, 3-4 ms at 720p)."""
    from rclpy.context import Context
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import Image

    from segmentation_safety.ros.replay import Collector, _unmapped

    context = Context()
    rclpy.init(context=context, args=[])
    try:
        collector = Collector(context, "/keep_test", None, frozenset({"hazard_overlay"}))
        collector.keep_enabled = True
        overlay = Image(height=2, width=2, encoding="rgb8", step=6, data=bytes(range(12)))
        overlay.header.stamp.sec = 3
        raw = serialize_message(overlay)
        taken = sys.getrefcount(raw)
        collector._callback("hazard_overlay", "hazard_overlay", Image)(raw)
        assert sys.getrefcount(raw) == taken  # nothing holds the taken buffer
        kept = collector.keep["hazard_overlay"]
        assert list(kept) == [3 * 10**9]
        assert _unmapped(kept) == {3 * 10**9: raw}
        assert kept == {}  # handed over, not held twice
        collector.destroy_node()
    finally:
        context.try_shutdown()


def test_the_replay_keeps_only_what_its_report_reads(
    bags: dict[str, Path], models: Path, tmp_path: Path
):
    """`safety` of the frames with ground truth (the anomaly metrics), overlays only when
    they are saved: a long bag kept whole held ~25 MB a frame at 2 MP."""
    from segmentation_safety.ros.replay import Replayer, ReplayOptions

    bag = read_bag(bags["sqlite3"])
    unlabelled = [f.stamp_ns for f in bag.frames[::2]]
    for stamp in unlabelled:
        del bag.gt_anomaly[stamp]
    config = tmp_path / "params.yaml"
    config.write_text(PARAMS)
    options = ReplayOptions(models_dir=models, config=config, warmup=1, keep_overlays=False)
    with Replayer(bag, options) as r:
        r.warm_up()
        trial = r.replay_bag()
        assert r.collector is not None
        kept = r.collector.keep
        assert set(kept["safety"]) == set(trial.answered) & set(bag.gt_anomaly)
        assert kept["safety"] and not set(kept["safety"]) & set(unlabelled)
        assert kept["hazard_overlay"] == {}


# -- the node in a process of its own (--node-process) -------------------------------------
def test_node_process_command_reads_back_every_parameter_type():
    from segmentation_safety.ros.node_process import node_command, parameter_value

    assert parameter_value(True) == "true" and parameter_value(False) == "false"
    assert parameter_value(float("nan")) == ".nan" and parameter_value(-math.inf) == "-.inf"
    assert parameter_value([512, 1024]) == "[512, 1024]"
    assert parameter_value("0.5") == '"0.5"'  # a string stays a string, not a number
    with pytest.raises(TypeError, match="parameter value"):
        parameter_value({"a": 1})
    argv = node_command("/ns", Path("p.yaml"), {"output_scale": 0.5, "device": "cpu"})
    ros = argv[argv.index("--ros-args") :]
    assert ros == ["--ros-args", "-r", "__ns:=/ns", "--params-file", "p.yaml",
                   "-p", "output_scale:=0.5", "-p", 'device:="cpu"']  # fmt: skip
    # What rcl itself reads back from such arguments: the types the node checks.
    from rclpy.context import Context
    from rclpy.node import Node

    ctx = Context()
    rclpy.init(context=ctx, args=[])
    try:
        values = {"a": True, "b": 0.5, "c": [1, 2], "d": "0.5", "e": float("inf"), "f": ""}
        args = ["--ros-args"] + [x for k, v in values.items()
                                 for x in ("-p", f"{k}:={parameter_value(v)}")]  # fmt: skip
        node = Node("probe", context=ctx, cli_args=args,
                    automatically_declare_parameters_from_overrides=True)  # fmt: skip
        got = {k: node.get_parameter(k).value for k in values}
        node.destroy_node()
    finally:
        ctx.try_shutdown()
    assert got == {**values, "c": [1, 2]} and isinstance(got["d"], str)


def test_replay_with_the_node_in_its_own_process(
    bags: dict[str, Path], models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from segmentation_safety.bags import read_bag
    from segmentation_safety.ros import replay
    from segmentation_safety.ros.replay import Replayer, ReplayOptions

    retained = []  # the node keeps freed memory in its process; the collector in this one
    real_retain = replay.host_memory.retain_freed_memory
    monkeypatch.setattr(
        replay.host_memory, "retain_freed_memory", lambda: retained.append(real_retain())
    )
    config = tmp_path / "params.yaml"
    config.write_text(PARAMS)
    options = ReplayOptions(models_dir=models, config=config, warmup=1, node_process=True)
    with Replayer(read_bag(bags["sqlite3"]), options) as r:
        assert r.node is None and r.process is not None and r.process.exited() is None
        assert retained == [True]
        r.warm_up()
        trial = r.replay_bag()
        process = r.process
    assert trial.frames_processed >= 1
    # The node's own stage timings crossed the process boundary with `safety`.
    stages = next(iter(trial.stages.values()))
    assert stages["segmenter"] > 0 and stages["transport_in"] >= 0 and stages["dispatch"] >= 0
    assert stages["subscriber"] >= 0  # the collector's, in this process
    assert process.exited() is not None  # stopped with the replay, its log removed
    assert not process.log.exists()


def test_a_node_that_died_or_answers_nothing_stops_a_benchmark(
    bags: dict[str, Path], models: Path, tmp_path: Path
):
    # A bench played on for minutes against a dead node, then reported success.
    from segmentation_safety.bags import read_bag
    from segmentation_safety.ros.replay import (
        MAX_UNANSWERED_IN_A_ROW,
        Replayer,
        ReplayError,
        ReplayOptions,
    )

    config = tmp_path / "params.yaml"
    config.write_text(PARAMS)
    options = ReplayOptions(models_dir=models, config=config, warmup=1, node_process=True)
    with Replayer(read_bag(bags["sqlite3"]), options) as r:
        r.warm_up()
        r.check_alive(MAX_UNANSWERED_IN_A_ROW - 1)  # alive, a few lost: goes on
        with pytest.raises(ReplayError, match="answered none of the last 5 frames"):
            r.check_alive(MAX_UNANSWERED_IN_A_ROW)
        r.process.proc.kill()
        r.process.proc.wait()
        with pytest.raises(ReplayError, match="the node process exited with code -9"):
            r.check_alive(0)


def test_a_warm_up_frame_lost_on_the_way_is_sent_again(
    bags: dict[str, Path], models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # The node reads best effort: a frame sent before its reader has matched our writer
    # is lost, and the warm-up waited for it until the start-up timeout (seen in CI).
    from segmentation_safety.bags import read_bag
    from segmentation_safety.ros import replay
    from segmentation_safety.ros.replay import Replayer, ReplayOptions

    monkeypatch.setattr(replay, "WARMUP_RESEND_S", 0.5)
    real_publish = replay.serialized_publish.publish
    lost = []
    config = tmp_path / "params.yaml"
    config.write_text(PARAMS)
    options = ReplayOptions(models_dir=models, config=config, warmup=1, startup_timeout_s=20)
    with Replayer(read_bag(bags["sqlite3"]), options) as r:

        def first_image_lost(publisher, data):
            if publisher is r.collector.image_pub and not lost:
                lost.append(data)
                return
            real_publish(publisher, data)

        monkeypatch.setattr(replay.serialized_publish, "publish", first_image_lost)
        r.warm_up()
        answered = dict(r.collector.answers)
    assert len(lost) == 1 and len(answered) == 1  # answered once, under the lost one's stamp
    assert cdr_stamp_ns(lost[0]) in answered


def test_a_node_process_that_cannot_start_is_a_clear_error(
    bags: dict[str, Path], models: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    config = tmp_path / "params.yaml"
    config.write_text(PARAMS)
    rc = main([
        "replay", "--bag", str(bags["sqlite3"]), "--models", str(models), "--out",
        str(tmp_path / "T.json"), "--config", str(config), "--node-process",
        "--param", "anomaly_detector=no_such_detector",
    ])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "node process exited with code 1" in err
    assert "unknown detector 'no_such_detector'" in err  # the node's own message
    assert not (tmp_path / "T.json").exists()


def test_a_node_process_ends_when_the_replay_is_killed(models: Path):
    import select
    import signal
    import subprocess
    import sys

    # A replay killed outright (no tear-down) must not leave its node running. The
    # stand-in replay starts a node, says where, and waits on its stdin until killed.
    parent = subprocess.Popen(
        [sys.executable, "-P", "-c", (
            "import sys\n"
            "from segmentation_safety.ros.node_process import NodeProcess, node_command\n"
            f"p = NodeProcess(node_command('/orphan_check', None, {{'models_dir': {str(models)!r},"
            " 'anomaly_detector': 'max_softmax'}))\n"
            "print(p.proc.pid, p.log, flush=True)\n"
            "sys.stdin.read()\n"
        )],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    pid, log = parent.stdout.readline().split()
    child = int(pid)
    wait_for(  # the node has loaded its models: it is running
        lambda: "models from" in Path(log).read_text(),
        "the node to load its models", timeout=60.0, detail=Path(log).read_text,
    )  # fmt: skip
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    pidfd = os.pidfd_open(child)  # readable once the process has ended
    try:
        ended = bool(select.select([pidfd], [], [], 30.0)[0])
        if not ended:
            os.kill(child, signal.SIGKILL)
    finally:
        os.close(pidfd)
    parent.stdin.close()
    parent.stdout.close()
    Path(log).unlink(missing_ok=True)  # its replay died before removing it
    assert ended, "the node process outlived its replay"


def test_overlays_are_the_first_middle_and_last_frames_as_numbered_bgr_pngs(tmp_path):
    import cv2
    import numpy as np
    from rclpy.serialization import serialize_message

    from segmentation_safety.ros.image_codec import encode_rgb8
    from segmentation_safety.ros.replay_report import save_overlays

    def frame(i: int) -> bytes:
        rgb = np.zeros((2, 3, 3), np.uint8)
        rgb[..., 0], rgb[..., 2] = 10 * i, 200  # red names the frame, blue is constant
        return serialize_message(encode_rgb8(rgb))

    overlays = {1000 + 7 * i: frame(i) for i in range(5)}  # stamps, not 0..4
    paths = save_overlays(overlays, tmp_path / "o", 3)
    assert [p.name for p in paths] == ["overlay_00.png", "overlay_01.png", "overlay_02.png"]
    read = [cv2.imread(str(p)) for p in paths]  # BGR
    assert [int(bgr[0, 0, 2]) for bgr in read] == [0, 20, 40]  # frames 0, 2 and 4
    assert all(bgr.shape == (2, 3, 3) and (bgr[..., 0] == 200).all() for bgr in read)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [p.name for p in paths]
    # Asking for more than there are writes each once; none asked, or none kept, writes none.
    assert len(save_overlays(overlays, tmp_path / "all", 9)) == 5
    assert save_overlays(overlays, tmp_path / "none", 0) == []
    assert save_overlays({}, tmp_path / "empty", 3) == [] and not (tmp_path / "empty").exists()


def test_a_misspelt_node_parameter_is_refused_before_the_replay(bags, tmp_path, capsys):
    rc = main(["replay", "--bag", str(bags["sqlite3"]), "--out", str(tmp_path / "T.json"),
               "--param", "anomaly_treshold=0.5"])  # fmt: skip
    assert rc == 2
    assert "anomaly_treshold is not a parameter of the node" in capsys.readouterr().err


def test_without_the_built_messages_replay_and_bench_say_what_to_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    # install/setup.bash not sourced: the generated messages do not import.
    monkeypatch.setitem(sys.modules, "segmentation_safety.msg", None)
    for argv in (
        ["replay", "--bag", str(tmp_path / "bag"), "--out", str(tmp_path / "T.json")],
        ["bench", "--node", "--bag", str(tmp_path / "bag"), "--out", str(tmp_path / "N.json")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "source install/setup.bash" in err and "Traceback" not in err, err
