"""`segsafe make-bag`: world and Lost & Found sequences -> rosbag2, read back with rosbags."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

pytest.importorskip("rosbags", reason="rosbags is not installed")
from rosbags.rosbag2 import Reader  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

from segmentation_safety.cli import main  # noqa: E402
from training.bags import DEFAULT_START_S, discover_sequences  # noqa: E402
from training.world.writer import write_world  # noqa: E402

H, W, N = 32, 64, 3
STORE = get_typestore(Stores.ROS2_JAZZY)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), array)


def write_world_sequence(root: Path, name: str, frames: int = N) -> Path:
    """The layout `segsafe world` writes under sequences/<name>/ (see training/world)."""
    rng = np.random.default_rng(len(name))
    d = root / "sequences" / name
    for i in range(frames):
        f = f"{i:06d}.png"
        _png(d / "images" / f, rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        _png(d / "labels" / f, rng.integers(0, 19, (H, W), dtype=np.uint8))
        _png(d / "anomaly" / f, rng.choice(np.array([0, 1, 255], np.uint8), (H, W)))
    (d / "timestamps.txt").write_text("".join(f"{i / 10:.6f}\n" for i in range(frames)))
    camera = {"fx": 50.0, "fy": 50.0, "cx": 31.5, "cy": 12.0, "width": W, "height": H}
    (d / "sequence.json").write_text(json.dumps({"name": name, "camera": camera}))
    return d


@pytest.fixture
def world(tmp_path: Path) -> Path:
    root = tmp_path / "world"
    write_world_sequence(root, "seq_000")
    write_world_sequence(root, "seq_001", frames=2)
    return root


def read_back(bag: Path) -> dict[str, list[tuple[int, object]]]:
    out: dict[str, list[tuple[int, object]]] = {}
    with Reader(bag) as reader:
        for conn, t, raw in reader.messages():
            out.setdefault(conn.topic, []).append((t, STORE.deserialize_cdr(raw, conn.msgtype)))
    return out


def stamp_ns(msg: object) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


@pytest.mark.parametrize("fmt", ["sqlite3", "mcap"])
def test_world_sequence_to_bag(world: Path, tmp_path: Path, fmt: str):
    bag = tmp_path / f"bag_{fmt}"
    args = ["make-bag", "--root", str(world), "--sequence", "seq_000", "--out", str(bag)]
    assert main([*args, "--format", fmt, "--frame-id", "cam0"]) == 0
    msgs = read_back(bag)
    topics = ["/camera/image_raw", "/camera/camera_info", "/ground_truth/labels"]
    assert sorted(msgs) == sorted([*topics, "/ground_truth/anomaly"])
    expected = [round((DEFAULT_START_S + i / 10) * 1e9) for i in range(N)]
    seq = world / "sequences" / "seq_000"
    for topic, items in msgs.items():
        assert len(items) == N, topic
        assert [t for t, _ in items] == expected, topic
        assert [stamp_ns(m) for _, m in items] == expected, topic
        assert all(m.header.frame_id == "cam0" for _, m in items)
    for i, (_, img) in enumerate(msgs["/camera/image_raw"]):
        assert (img.encoding, img.height, img.width, img.step) == ("rgb8", H, W, 3 * W)
        want = cv2.cvtColor(cv2.imread(str(seq / "images" / f"{i:06d}.png")), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(img.data.reshape(H, W, 3), want)
    for topic, folder in (("/ground_truth/labels", "labels"), ("/ground_truth/anomaly", "anomaly")):
        for i, (_, img) in enumerate(msgs[topic]):
            assert (img.encoding, img.step) == ("mono8", W)
            want = cv2.imread(str(seq / folder / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(img.data.reshape(H, W), want)
    info = msgs["/camera/camera_info"][0][1]
    assert (info.width, info.height, info.distortion_model) == (W, H, "plumb_bob")
    np.testing.assert_allclose(info.k, [50, 0, 31.5, 0, 50, 12, 0, 0, 1])

    meta = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["version"] == 8
    assert meta["storage_identifier"] == fmt
    assert meta["message_count"] == 4 * N
    assert meta["starting_time"]["nanoseconds_since_epoch"] == expected[0]
    assert meta["duration"]["nanoseconds"] == expected[-1] - expected[0]
    assert all((bag / p).is_file() for p in meta["relative_file_paths"])
    for entry in meta["topics_with_message_count"]:
        topic = entry["topic_metadata"]
        assert topic["serialization_format"] == "cdr"
        assert entry["message_count"] == N
        assert topic["type"] in ("sensor_msgs/msg/Image", "sensor_msgs/msg/CameraInfo")
        assert topic["type_description_hash"].startswith("RIHS01_")
        qos = yaml.safe_load(topic["offered_qos_profiles"])  # v8: a YAML string
        assert qos[0]["reliability"] == 1 and qos[0]["depth"] == 10
    assert not list(tmp_path.glob(".*partial*")), "staging directory left behind"


def _laf(root: Path, split: str, city: str, seq: int, frames: list[int]) -> None:
    for f in frames:
        stem = f"{city}_{seq:06d}_{f:06d}"
        _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
             np.full((H, W, 3), f, np.uint8))  # fmt: skip
        ids = np.zeros((H, W), np.uint8)
        ids[H // 2 :] = 1  # free space
        ids[H // 2 :, :4] = 2  # an obstacle on it
        _png(root / "gtCoarse" / split / city / f"{stem}_gtCoarse_labelIds.png", ids)


def test_lost_and_found_layout(tmp_path: Path):
    root = tmp_path / "laf"
    _laf(root, "test", "04_Maurener_Weg_8", 1, [60, 30, 50])
    _laf(root, "train", "01_Hanns_Klemm_Str_45", 0, [10, 20])
    ts = root / "timestamp" / "train" / "01_Hanns_Klemm_Str_45"
    ts.mkdir(parents=True)
    # As cityscapesScripts writes them: ns relative to the sequence's first frame (0).
    for f, ns in ((10, 0), (20, 50_000_123)):
        (ts / f"01_Hanns_Klemm_Str_45_000000_{f:06d}_timestamp.txt").write_text(f"{ns}\n")
    seqs = discover_sequences(root)
    assert sorted(seqs) == ["01_Hanns_Klemm_Str_45_000000", "04_Maurener_Weg_8_000001"]

    bag = tmp_path / "bag"
    args = ["make-bag", "--root", str(root), "--sequence", "04_Maurener_Weg_8_000001"]
    assert main([*args, "--out", str(bag)]) == 0
    msgs = read_back(bag)
    images = msgs["/camera/image_raw"]
    # Ordered by frame number, stamped from it at 10 Hz without timestamp files.
    assert [int(m.data[0]) for _, m in images] == [30, 50, 60]
    assert [stamp_ns(m) for _, m in images] == [
        round((DEFAULT_START_S + f / 10) * 1e9) for f in (30, 50, 60)
    ]
    labels = msgs["/ground_truth/labels"][0][1].data.reshape(H, W)
    anomaly = msgs["/ground_truth/anomaly"][0][1].data.reshape(H, W)
    assert labels[0, 0] == 255 and labels[-1, -1] == 0  # free space -> road
    assert (anomaly[0, 0], anomaly[-1, -1], anomaly[-1, 0]) == (255, 0, 1)
    info = msgs["/camera/camera_info"][0][1]
    assert info.k[0] == pytest.approx(2262.52 * W / 2048)  # documented default camera

    bag2 = tmp_path / "bag2"
    assert main(["make-bag", "--root", str(root), "--sequence", "01_Hanns_Klemm_Str_45_000000",
                 "--out", str(bag2), "--format", "mcap"]) == 0  # fmt: skip
    stamps = [stamp_ns(m) for _, m in read_back(bag2)["/camera/image_raw"]]
    # From the timestamp files, shifted off 0 (an unset stamp to ROS tools) as a world's.
    start = round(DEFAULT_START_S * 1e9)
    assert stamps == [start, start + 50_000_123]


def test_a_cityscapes_root_is_not_taken_for_lost_and_found(tmp_path: Path, capsys):
    # The same layout: Cityscapes' label ids read as Lost & Found's made 89% of a frame,
    # road included, "anomaly".
    root = tmp_path / "cityscapes"
    _laf(root, "val", "frankfurt", 0, [19])
    assert main(["make-bag", "--root", str(root), "--out", str(tmp_path / "bag")]) == 2
    err = capsys.readouterr().err
    assert "(frankfurt) are not Lost & Found's" in err and "Cityscapes" in err, err
    assert not (tmp_path / "bag").exists()


def test_lost_and_found_stamps_in_seconds_and_its_camera_json(tmp_path: Path):
    root = tmp_path / "laf"
    city = "02_Hanns_Klemm_Str_44"
    _laf(root, "train", city, 3, [10, 20])
    for f, text in ((10, "1500000000.25"), (20, "1500000000.375")):  # seconds, not ns
        stem = f"{city}_000003_{f:06d}"
        ts = root / "timestamp" / "train" / city / f"{stem}_timestamp.txt"
        ts.parent.mkdir(parents=True, exist_ok=True)
        ts.write_text(text + "\n")
        cam = root / "camera" / "train" / city / f"{stem}_camera.json"
        cam.parent.mkdir(parents=True, exist_ok=True)
        intrinsic = {"fx": 2200.0, "fy": 2100.0, "u0": 1040.0, "v0": 500.0}
        cam.write_text(json.dumps({"intrinsic": intrinsic}))
    bag = tmp_path / "bag"
    assert main(["make-bag", "--root", str(root), "--out", str(bag)]) == 0
    msgs = read_back(bag)
    stamps = [stamp_ns(m) for _, m in msgs["/camera/image_raw"]]
    # (Seconds as a double carry ~0.1 µs at this epoch: compared to the microsecond.)
    expected = [1_500_000_000_250_000_000, 1_500_000_000_375_000_000]
    assert len(stamps) == 2
    assert all(abs(a - b) < 1000 for a, b in zip(stamps, expected, strict=True)), stamps
    # Intrinsics of the 2048x1024 camera, scaled to the 64x32 frames (1/32 each way).
    info = msgs["/camera/camera_info"][0][1]
    assert (info.width, info.height) == (W, H)
    np.testing.assert_allclose(info.k, [2200 / 32, 0, 1040 / 32, 0, 2100 / 32, 500 / 32, 0, 0, 1])


def test_lost_and_found_ground_truth_is_the_datasets_people_and_bicycles_void(tmp_path: Path):
    from training.datasets import LostAndFound

    # Background, free space, obstacles 2 and 30, the bicycle (26), the kid dummy (29) and
    # a child (40): replay's metrics must score what `evaluate --dataset lostandfound` does.
    root = tmp_path / "laf"
    city, stem = "04_Maurener_Weg_8", "04_Maurener_Weg_8_000001_000030"
    _png(root / "leftImg8bit/test" / city / f"{stem}_leftImg8bit.png",
         np.zeros((H, W, 3), np.uint8))  # fmt: skip
    ids = np.zeros((H, W), np.uint8)
    ids[:, 8:] = np.repeat([1, 2, 30, 26, 29, 40, 1], 8)
    _png(root / "gtCoarse/test" / city / f"{stem}_gtCoarse_labelIds.png", ids)
    bag = tmp_path / "bag"
    assert main(["make-bag", "--root", str(root), "--out", str(bag)]) == 0
    anomaly = read_back(bag)["/ground_truth/anomaly"][0][1].data.reshape(H, W)
    expected = np.repeat(np.array([255, 0, 1, 1, 255, 255, 255, 0], np.uint8), 8)
    np.testing.assert_array_equal(anomaly[0], expected)
    np.testing.assert_array_equal(anomaly, LostAndFound(root, "test")[0]["anomaly"])


def test_bad_inputs_are_refused(world: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    bag = tmp_path / "bag"
    base = ["make-bag", "--root", str(world), "--out", str(bag)]
    assert main([*base, "--sequence", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown sequence 'nope'" in err and "seq_000" in err and "seq_001" in err
    assert not bag.exists()

    (world / "sequences" / "empty" / "images").mkdir(parents=True)
    assert main([*base, "--sequence", "empty"]) == 2
    assert "has no frames" in capsys.readouterr().err

    assert main(["make-bag", "--root", str(tmp_path / "missing"), "--out", str(bag)]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main(["make-bag", "--root", str(tmp_path / "plain"), "--out", str(bag)]) == 2
    assert "no sequences found" in capsys.readouterr().err

    bag.mkdir()
    assert main([*base, "--sequence", "seq_000"]) == 2
    assert "exists already" in capsys.readouterr().err
    bag.rmdir()

    assert main([*base, "--sequence", "seq_000", "--topic", "/camera/image_raw/"]) == 2
    assert "is not a ROS topic name: ends with '/'" in capsys.readouterr().err

    # A frame that cannot be read half-way: an error, and no half bag anywhere.
    (world / "sequences" / "seq_000" / "images" / "000001.png").write_bytes(b"not a png")
    assert main([*base, "--sequence", "seq_000"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert not bag.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "world"]


def test_sigterm_half_way_leaves_no_half_bag_and_a_killed_runs_staging_is_removed(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    import os
    import signal
    import subprocess
    import sys

    from training import bags as training_bags

    read = training_bags._read
    seen = []

    def read_then_terminate(path, color):  # what `timeout` or `docker stop` sends
        seen.append(path)
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return read(path, color=color)

    monkeypatch.setattr(training_bags, "_read", read_then_terminate)
    bag = tmp_path / "bag"
    assert main(["make-bag", "--root", str(world), "--sequence", "seq_000",
                 "--out", str(bag)]) == 143  # fmt: skip
    assert "terminated" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]  # no staging left
    monkeypatch.setattr(training_bags, "_read", read)
    # A run killed outright (SIGKILL) cannot clean up: the next one for the same bag does,
    # and leaves a live run's staging alone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".bag.partial-{dead.pid}" / "bag").mkdir(parents=True)
    (tmp_path / f".bag.partial-{os.getppid()}").mkdir()
    assert main(["make-bag", "--root", str(world), "--sequence", "seq_000",
                 "--out", str(bag)]) == 0  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".bag.partial-{os.getppid()}",
        "bag",
        "world",
    ]


def test_a_world_gives_only_its_sequences(tmp_path: Path, capsys: pytest.CaptureFixture):
    size = dict(height=32, width=64, val=0, anomaly=0, negatives=0, progress=False)
    bare = tmp_path / "bare"
    write_world(bare, train=1, sequences=0, **size)
    bag = tmp_path / "bag"
    assert main(["make-bag", "--root", str(bare), "--out", str(bag)]) == 2
    err = capsys.readouterr().err
    assert "world has no sequences" in err and "segsafe world --sequences N" in err
    assert not bag.exists()
    # Its train frames (leftImg8bit/, the Lost & Found layout) are stills, not sequences.
    world = tmp_path / "world"
    write_world(world, train=1, sequences=1, sequence_length=2, **size)
    assert list(discover_sequences(world)) == ["seq_000"]
    # --list needs no --out; anything else does.
    assert main(["make-bag", "--root", str(world), "--list"]) == 0
    assert capsys.readouterr().out.startswith("seq_000\t")
    assert main(["make-bag", "--root", str(world)]) == 2
    assert "--out is required" in capsys.readouterr().err


# -- frame folders and videos -----------------------------------------------------------
def write_frames(folder: Path, count: int, ext: str = ".png", h: int = H, w: int = W) -> list:
    """Frames named without zero padding (frame_2 before frame_10); returns their RGB."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(count)
    frames = []
    for i in range(count):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert cv2.imwrite(
            str(folder / f"frame_{i + 1}{ext}"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        )
        frames.append(rgb)
    return frames


def write_mp4(path: Path, count: int, fps: float, h: int = H, w: int = W) -> list[int]:
    """An mp4 of flat grey frames (grey levels returned); skips where OpenCV cannot."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write mp4 (no FFmpeg with mpeg4)")
    levels = [20 + 20 * i for i in range(count)]
    for level in levels:
        writer.write(np.full((h, w, 3), level, np.uint8))
    writer.release()
    cap = cv2.VideoCapture(str(path))
    readable = cap.isOpened() and cap.read()[0]
    cap.release()
    if not readable:
        pytest.skip("this OpenCV build cannot read back the mp4 it wrote")
    return levels


def test_frames_folder_to_bag_in_name_order_at_the_rate(tmp_path: Path):
    frames = write_frames(tmp_path / "frames", 11)
    (tmp_path / "frames" / "notes.txt").write_text("not a frame")
    bag = tmp_path / "bag"
    assert main(["make-bag", "--frames", str(tmp_path / "frames"), "--out", str(bag),
                 "--rate", "5"]) == 0  # fmt: skip
    msgs = read_back(bag)
    assert sorted(msgs) == ["/camera/camera_info", "/camera/image_raw"]
    images = msgs["/camera/image_raw"]
    expected = [round(DEFAULT_START_S * 1e9) + i * 200_000_000 for i in range(11)]
    assert [t for t, _ in images] == expected and [stamp_ns(m) for _, m in images] == expected
    for (_, img), rgb in zip(images, frames):  # frame_1, frame_2, ..., frame_10, frame_11
        assert (img.encoding, img.height, img.width) == ("rgb8", H, W)
        np.testing.assert_array_equal(img.data.reshape(H, W, 3), rgb)
    info = msgs["/camera/camera_info"][0][1]
    assert (info.width, info.height) == (W, H) and info.k[0] == pytest.approx(2262.52 * W / 2048)
    assert not list(tmp_path.glob(".*partial*"))


def test_jpeg_frames_go_in_as_they_are_with_compressed(tmp_path: Path):
    write_frames(tmp_path / "frames", 4, ".jpg")
    bag = tmp_path / "bag"
    assert main(["make-bag", "--frames", str(tmp_path / "frames"), "--out", str(bag),
                 "--compressed", "--limit", "3", "--format", "mcap"]) == 0  # fmt: skip
    msgs = read_back(bag)
    assert sorted(msgs) == ["/camera/camera_info", "/camera/image_raw/compressed"]
    images = msgs["/camera/image_raw/compressed"]
    assert len(images) == 3 and len(msgs["/camera/camera_info"]) == 3
    assert [t for t, _ in images][1] - [t for t, _ in images][0] == 100_000_000  # 10 Hz
    for i, (_, msg) in enumerate(images):
        assert msg.format == "jpeg"
        assert bytes(msg.data) == (tmp_path / "frames" / f"frame_{i + 1}.jpg").read_bytes()
    # Resized frames cannot keep the file's bytes: they are encoded again.
    bag2 = tmp_path / "bag2"
    assert main(["make-bag", "--frames", str(tmp_path / "frames"), "--out", str(bag2),
                 "--compressed", "--resize", "32x16"]) == 0  # fmt: skip
    (_, msg), *_ = read_back(bag2)["/camera/image_raw/compressed"]
    assert msg.format == "rgb8; jpeg compressed bgr8"
    assert cv2.imdecode(msg.data, cv2.IMREAD_COLOR).shape == (16, 32, 3)


def test_video_to_bag_at_its_own_rate_or_the_given_one(tmp_path: Path):
    levels = write_mp4(tmp_path / "clip.mp4", 5, fps=12.5)
    bag = tmp_path / "bag"
    assert main(["make-bag", "--video", str(tmp_path / "clip.mp4"), "--out", str(bag)]) == 0
    images = read_back(bag)["/camera/image_raw"]
    assert len(images) == 5
    assert [t for t, _ in images] == [
        round(DEFAULT_START_S * 1e9) + i * 80_000_000 for i in range(5)
    ]  # 12.5 fps, the file's own
    for (_, img), level in zip(images, levels):
        assert (img.encoding, img.height, img.width) == ("rgb8", H, W)
        assert abs(float(img.data.mean()) - level) < 6  # lossy, but the right frame

    bag2 = tmp_path / "bag2"
    args = ["--rate", "4", "--limit", "3", "--compressed", "--resize", "32x16"]
    assert main(["make-bag", "--video", str(tmp_path / "clip.mp4"), "--out", str(bag2), *args]) == 0
    images = read_back(bag2)["/camera/image_raw/compressed"]
    assert [t - images[0][0] for t, _ in images] == [0, 250_000_000, 500_000_000]
    decoded = [cv2.imdecode(m.data, cv2.IMREAD_COLOR) for _, m in images]
    assert all(d.shape == (16, 32, 3) for d in decoded)
    assert [abs(float(d.mean()) - lv) < 6 for d, lv in zip(decoded, levels)] == [True] * 3


def test_bad_frame_folders_videos_and_rates_are_refused(tmp_path: Path, capsys):
    bag = tmp_path / "bag"

    def refused(*args: str) -> str:
        assert main(["make-bag", *args, "--out", str(bag)]) == 2
        assert not bag.exists() and not list(tmp_path.glob(".*partial*"))
        return capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    assert "no .png/.jpg/.jpeg images" in refused("--frames", str(tmp_path / "empty"))
    assert "not a directory" in refused("--frames", str(tmp_path / "nowhere"))
    frames = tmp_path / "frames"
    write_frames(frames, 3)
    for rate in ("0", "-2", "nan", "inf"):
        assert "must be a frame rate" in refused("--frames", str(frames), "--rate", rate)
    assert "WIDTHxHEIGHT" in refused("--frames", str(frames), "--resize", "big")
    assert "at least 1" in refused("--frames", str(frames), "--limit", "0")
    assert "apply to --frames/--video only" in refused("--root", str(tmp_path), "--rate", "5")
    write_frames(frames, 1, h=H * 2)  # overwrites frame_1 with a taller one
    err = refused("--frames", str(frames))
    assert "frame_2.png" in err and "use --resize" in err
    (frames / "frame_1.png").write_bytes(b"not a png")
    assert "cannot read image" in refused("--frames", str(frames))

    (tmp_path / "fake.mp4").write_text("not a video")
    assert "cannot be opened as a video" in refused("--video", str(tmp_path / "fake.mp4"))
    assert "no such file" in refused("--video", str(tmp_path / "none.mp4"))


def test_exif_rotated_jpegs_keep_their_stored_size_raw_and_compressed(tmp_path: Path):
    from PIL import Image

    # Orientation 6 (turn 90° clockwise to view): decoded with it, a 64x32 frame came out
    # 32x64, and so did the CameraInfo, while the node decodes the stored bytes unturned.
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        Image.fromarray(np.full((H, W, 3), 60 * i, np.uint8)).save(frames / f"f{i}.jpg", exif=exif)
    sizes = {}
    for mode in ("raw", "compressed"):
        bag = tmp_path / mode
        extra = ["--compressed"] if mode == "compressed" else []
        assert main(["make-bag", "--frames", str(frames), "--out", str(bag), *extra]) == 0
        msgs = read_back(bag)
        info = msgs["/camera/camera_info"][0][1]
        (_, image), *_ = msgs["/camera/image_raw" + ("/compressed" if extra else "")]
        if extra:  # as the node decodes it (image_codec.decode_checked)
            flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
            size = cv2.imdecode(image.data, flags).shape[1::-1]
        else:
            size = (image.width, image.height)
        assert (info.width, info.height) == size, mode
        sizes[mode] = size
    assert sizes == {"raw": (W, H), "compressed": (W, H)}  # as stored, one size


def test_topics_must_be_ros_names_and_name_the_raw_image(tmp_path: Path, capsys):
    write_frames(tmp_path / "frames", 2)
    bag = tmp_path / "bag"

    def make(*args: str) -> int:
        return main(["make-bag", "--frames", str(tmp_path / "frames"), "--out", str(bag), *args])

    # rosbag2's player skips topics whose names are not ROS names: such a bag played nothing.
    for topic in ("/cam era/img", "/camera/image_raw/", "/a//b", "/camera/1st", "~/image"):
        assert make("--topic", topic) == 2, topic
        err = capsys.readouterr().err
        assert f"--topic {topic!r} is not a ROS topic name" in err, err
        assert not bag.exists()
    assert make("--topic", "/camera/image_raw/compressed", "--compressed") == 2
    assert "--topic names the raw image topic (e.g. /camera/image_raw)" in capsys.readouterr().err
    for topic in ("/camera/camera_info", "/ground_truth/image"):
        assert make("--topic", topic) == 2
        assert "CameraInfo or ground truth" in capsys.readouterr().err
    assert not bag.exists() and not list(tmp_path.glob(".*partial*"))
    # A relative name: the camera_info is its sibling, as image_transport puts it.
    assert make("--topic", "image_raw") == 0
    assert sorted(read_back(bag)) == ["camera_info", "image_raw"]
