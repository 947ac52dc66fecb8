"""Writing the synthetic world to disk in the Cityscapes layout plus the extra splits.

```
OUT/world.json
OUT/leftImg8bit/{train,val}/<city>/<city>_<seq>_000019_leftImg8bit.png
OUT/gtFine/{train,val}/<city>/<city>_<seq>_000019_gtFine_labelIds.png
OUT/gtFine/{train,val}/<city>/<city>_<seq>_000019_gtFine_labelTrainIds.png
OUT/anomaly/images/anomaly_<i>.png     RGB with lost cargo on the road
OUT/anomaly/labels/anomaly_<i>.png     0 inlier, 1 anomaly, 255 void (ego-vehicle hood)
OUT/anomaly/semantic/anomaly_<i>.png   train ids (255 on cargo and hood), for open-set mIoU
OUT/sequences/seq_<i>/{images,labels,anomaly}/<frame>.png, timestamps.txt, sequence.json
OUT/negatives/images/negative_<i>.png  DenseHybrid negatives
OUT/negatives/masks/negative_<i>.png   instance ids 1..n, 0 background
OUT/negatives/scenes/images/scene_<i>.png  streets with decoys (negative kinds) on the road
OUT/negatives/scenes/labels/scene_<i>.png  train ids, 255 on decoys and hood
OUT/negatives/scenes/masks/scene_<i>.png   1 on decoys, 0 elsewhere
```

The world is rendered into ``OUT/.world.partial/`` and its entries are moved into ``OUT``
only when all of it is written, ``world.json`` last: ``OUT`` never holds a half-written
world. ``OUT`` must be new or empty unless ``force``; then the entries above (and only
those) of the world already there are replaced, and anything else in ``OUT`` is kept.

Every item draws from its own generator seeded by (seed, split, index), so the output
is byte-identical for a seed and an item does not depend on how many others are written.
The only void in the train/val labels is the ego-vehicle hood, written as label id 1
("ego vehicle") in ``*_labelIds.png``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from segmentation_safety.errors import InvalidArgumentError
from segmentation_safety.labels import LABELS, NUM_CLASSES, VOID, train_ids_to_label_ids
from training.world.cargo import ANOMALY_KINDS
from training.world.layout import sample_layout
from training.world.negatives import NEGATIVE_KINDS, render_negative
from training.world.render import intrinsics, render_decoy_scene, render_scene, render_view

TRAIN_CITIES = ("synthberg", "polyville", "rasterheim")
VAL_CITIES = ("voxelstadt",)
#: Cityscapes annotates the 20th frame of each 30-frame snippet; we keep its number.
FRAME = 19
EGO_VEHICLE_LABEL_ID = 1
FPS = 10.0
#: What a world writes at the top of OUT: ``force`` replaces these and nothing else.
WORLD_ENTRIES = ("world.json", "leftImg8bit", "gtFine", "anomaly", "sequences", "negatives")
WORLD_FORMAT = "segmentation_safety synthetic world"
# Beside the world in OUT (same file system, so moving an entry in is a rename); by
# their names ours, so a run may remove what a killed run left.
_STAGING = ".world.partial"
_REPLACED = ".world.replaced"
#: Smallest frame the scene renderer lays out sensibly.
MIN_SIZE = 32
_SPLIT_CODES = {
    "train": 1,
    "val": 2,
    "anomaly": 3,
    "sequences": 4,
    "negatives": 5,
    "negative_scenes": 6,
}
# Fast settings; both lossless. Huffman-only suits noisy photos, deflate suits label maps.
_PNG_IMAGE = [
    cv2.IMWRITE_PNG_COMPRESSION,
    1,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
]
_PNG_LABEL = [cv2.IMWRITE_PNG_COMPRESSION, 1]


def item_rng(seed: int, split: str, index: int, *extra: int) -> np.random.Generator:
    """The generator of one item: independent of every other item and of the counts."""
    return np.random.default_rng([seed, _SPLIT_CODES[split], index, *extra])


def cityscapes_name(city: str, seq: int, frame: int = FRAME) -> str:
    """``<city>_<seq:06d>_<frame:06d>``, the Cityscapes stem."""
    return f"{city}_{seq:06d}_{frame:06d}"


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    params = _PNG_LABEL
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
        params = _PNG_IMAGE
    if not cv2.imwrite(str(path), array, params):
        raise OSError(f"could not write {path}")


def _label_ids(train_ids: np.ndarray) -> np.ndarray:
    ids = train_ids_to_label_ids(train_ids)
    ids[train_ids == VOID] = EGO_VEHICLE_LABEL_ID
    return ids


def write_cityscapes_item(out: Path, split: str, index: int, seed: int, h: int, w: int) -> None:
    """One train/val frame with its two label files."""
    cities = TRAIN_CITIES if split == "train" else VAL_CITIES
    city = cities[index % len(cities)]
    stem = cityscapes_name(city, index // len(cities))
    image, train_ids, _ = render_scene(item_rng(seed, split, index), h, w)
    _write_png(out / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
    gt = out / "gtFine" / split / city
    _write_png(gt / f"{stem}_gtFine_labelTrainIds.png", train_ids)
    _write_png(gt / f"{stem}_gtFine_labelIds.png", _label_ids(train_ids))


def write_anomaly_item(out: Path, index: int, seed: int, h: int, w: int) -> None:
    """One frame with 1-3 pieces of lost cargo and its Fishyscapes-style labels."""
    rng = item_rng(seed, "anomaly", index)
    image, train_ids, anomaly = render_scene(rng, h, w, cargo=int(rng.integers(1, 4)))
    name = f"anomaly_{index:06d}.png"
    _write_png(out / "anomaly" / "images" / name, image)
    _write_png(out / "anomaly" / "labels" / name, anomaly)
    _write_png(out / "anomaly" / "semantic" / name, train_ids)


def write_sequence(
    out: Path, index: int, seed: int, h: int, w: int, length: int, fps: float = FPS
) -> dict:
    """One ego-motion sequence; every other sequence carries lost cargo ahead."""
    rng = item_rng(seed, "sequences", index)
    cargo = int(rng.integers(1, 3)) if index % 2 == 0 else 0
    duration = (length - 1) / fps
    layout = sample_layout(rng, h, w, duration=duration, cargo=cargo, cargo_ahead=(8.0, 25.0))
    name = f"seq_{index:03d}"
    root = out / "sequences" / name
    stamps = []
    for f in range(length):
        t = f / fps
        image, train_ids, anomaly = render_view(layout, t, item_rng(seed, "sequences", index, f))
        frame = f"{f:06d}.png"
        _write_png(root / "images" / frame, image)
        _write_png(root / "labels" / frame, train_ids)
        _write_png(root / "anomaly" / frame, anomaly)
        stamps.append(f"{t:.6f}")
    (root / "timestamps.txt").write_text("\n".join(stamps) + "\n")
    meta = {
        "name": name,
        "frames": length,
        "fps": fps,
        "ego_speed_mps": round(layout.ego_speed, 4),
        "cargo": sorted(c.kind for c in layout.cargo),
        "camera": {k: round(float(v), 4) for k, v in intrinsics(layout).items()},
        "files": {
            "images": "images/%06d.png",
            "labels": "labels/%06d.png",
            "anomaly": "anomaly/%06d.png",
            "timestamps": "timestamps.txt",
        },
    }
    (root / "sequence.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def write_negative(out: Path, index: int, seed: int, h: int, w: int) -> None:
    """One negative image and its instance mask."""
    image, inst, _ = render_negative(item_rng(seed, "negatives", index), h, w)
    name = f"negative_{index:06d}.png"
    _write_png(out / "negatives" / "images" / name, image)
    _write_png(out / "negatives" / "masks" / name, inst)


def write_negative_scene(out: Path, index: int, seed: int, h: int, w: int) -> None:
    """One street with decoys, its train ids and its decoy mask."""
    image, train_ids, mask = render_decoy_scene(item_rng(seed, "negative_scenes", index), h, w)
    name = f"scene_{index:06d}.png"
    root = out / "negatives" / "scenes"
    _write_png(root / "images" / name, image)
    _write_png(root / "labels" / name, train_ids)
    _write_png(root / "masks" / name, mask)


_CHUNK = 16  # items per job handed to a worker process

#: One unit of work: (writer, split, index, images it writes).
Task = tuple[str, str, int, int]


def _tasks(counts: dict[str, int], sequence_length: int) -> list[Task]:
    tasks: list[Task] = []
    for split in ("train", "val"):
        tasks += [("cityscapes", split, i, 1) for i in range(counts[split])]
    tasks += [("anomaly", "anomaly", i, 1) for i in range(counts["anomaly"])]
    tasks += [("sequence", "sequences", i, sequence_length) for i in range(counts["sequences"])]
    tasks += [("negative", "negatives", i, 1) for i in range(counts["negatives"])]
    tasks += [("negative_scene", "negatives", i, 1) for i in range(counts["negative_scenes"])]
    return tasks


def _write_chunk(
    tasks: list[Task], out: Path, seed: int, h: int, w: int, sequence_length: int
) -> int:
    """Write ``tasks``; returns the number of images written."""
    for kind, split, i, _ in tasks:
        if kind == "cityscapes":
            write_cityscapes_item(out, split, i, seed, h, w)
        elif kind == "anomaly":
            write_anomaly_item(out, i, seed, h, w)
        elif kind == "sequence":
            write_sequence(out, i, seed, h, w, sequence_length)
        elif kind == "negative":
            write_negative(out, i, seed, h, w)
        else:
            write_negative_scene(out, i, seed, h, w)
    return sum(t[3] for t in tasks)


def world_description(
    seed: int, counts: dict[str, int], height: int, width: int, sequence_length: int
) -> dict:
    """The content of ``world.json``."""
    return {
        "format": WORLD_FORMAT,
        "version": 1,
        "seed": seed,
        "height": height,
        "width": width,
        "counts": counts,
        "sequence_length": sequence_length,
        "fps": FPS,
        "cities": {"train": list(TRAIN_CITIES), "val": list(VAL_CITIES)},
        "num_classes": NUM_CLASSES,
        "classes": [
            {
                "train_id": lb.train_id,
                "name": lb.name,
                "label_id": lb.label_id,
                "color": list(lb.color),
            }
            for lb in sorted(LABELS, key=lambda lb: lb.train_id)
            if lb.train_id != VOID
        ],
        "void": {"train_id": VOID, "label_id": EGO_VEHICLE_LABEL_ID, "what": "ego-vehicle hood"},
        "anomaly_labels": {"0": "inlier", "1": "anomaly (lost cargo)", "255": "void (hood)"},
        "anomaly_kinds": sorted(ANOMALY_KINDS),
        "negative_kinds": sorted(NEGATIVE_KINDS),
    }


def _check_size(counts: dict[str, int], height: int, width: int, sequence_length: int) -> None:
    """Refuse a size outside what the renderer accepts, naming each bad flag."""
    bad = [f"--{k.replace('_', '-')} {v} (must be 0 or more)" for k, v in counts.items() if v < 0]
    bad += [
        f"--{k} {v} (must be {MIN_SIZE} or more)"
        for k, v in (("height", height), ("width", width))
        if v < MIN_SIZE
    ]
    if sequence_length < 1:
        bad.append(f"--sequence-length {sequence_length} (must be 1 or more)")
    if bad:
        raise InvalidArgumentError(f"bad world size: {', '.join(bad)}")


def is_world(root: Path) -> bool:
    """Whether ``root`` holds a complete world (its ``world.json``, written last)."""
    try:
        return json.loads((root / "world.json").read_text()).get("format") == WORLD_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _prepare_out(out: Path, force: bool) -> None:
    """Create ``out`` or check that a world may be written into it (see the module doc)."""
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgumentError(f"--out {out}: cannot create it ({e.strerror})") from e
    replaced = out / _REPLACED
    if replaced.is_dir() and not is_world(out):
        # A kill while the last run swapped worlds (world.json moves aside first and in
        # last): every world entry in OUT came from the new world, so the old world is
        # put back whole in their place.
        for name in WORLD_ENTRIES:
            _remove(out / name)
            if (replaced / name).exists():
                (replaced / name).rename(out / name)
    for name in (_STAGING, _REPLACED):
        shutil.rmtree(out / name, ignore_errors=True)
    present = sorted(p.name for p in out.iterdir())
    if not present:
        return
    if not force:
        what = "a world" if is_world(out) else f"{len(present)} entries, e.g. {present[0]}"
        raise InvalidArgumentError(
            f"--out {out}: not empty (holds {what}); pass --force to replace the world "
            "there and keep everything else, or choose a new or empty directory"
        )
    clashes = [n for n in present if n in WORLD_ENTRIES]
    if clashes and not is_world(out):
        # Cityscapes itself, say, has leftImg8bit/ and gtFine/: only a world (its
        # world.json) is ours to replace.
        raise InvalidArgumentError(
            f"--out {out}: holds {', '.join(clashes)} but no world.json of a complete "
            "world, so --force will not replace them; choose another directory"
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _move_in(staging: Path, out: Path) -> None:
    """Replace the world entries of ``out`` with those in ``staging``, world.json last."""
    replaced = out / _REPLACED
    replaced.mkdir()
    # world.json leaves first and arrives last: while entries move, OUT is not a world.
    for name in WORLD_ENTRIES:
        if (out / name).exists() or (out / name).is_symlink():
            (out / name).rename(replaced / name)
    for name in (*WORLD_ENTRIES[1:], WORLD_ENTRIES[0]):
        if (staging / name).exists():
            (staging / name).rename(out / name)
    staging.rmdir()
    shutil.rmtree(replaced)


def write_world(
    out_dir: str | os.PathLike,
    seed: int = 0,
    train: int = 1000,
    val: int = 200,
    anomaly: int = 100,
    sequences: int = 4,
    height: int = 256,
    width: int = 512,
    sequence_length: int = 30,
    negatives: int | None = None,
    negative_scenes: int | None = None,
    progress: bool = True,
    workers: int = 1,
    force: bool = False,
) -> dict:
    """Render the whole world into ``out_dir``; returns timing and counts.

    ``negatives`` defaults to half the training count (at least 1 when ``train`` > 0),
    ``negative_scenes`` (streets with decoys) to ``negatives``.
    ``workers`` > 1 renders in that many processes (same bytes as one).
    ``out_dir`` must be new or empty; ``force`` replaces the world in it instead (see
    the module doc). Nothing is moved into ``out_dir`` before the whole world is written.
    """
    if negatives is None:
        negatives = max(train // 2, 1) if train else 0
    if negative_scenes is None:
        negative_scenes = negatives
    counts = {
        "train": train,
        "val": val,
        "anomaly": anomaly,
        "sequences": sequences,
        "negatives": negatives,
        "negative_scenes": negative_scenes,
    }
    _check_size(counts, height, width, sequence_length)
    out = Path(out_dir)
    _prepare_out(out, force)
    staging = out / _STAGING
    staging.mkdir()
    try:
        stats = _render(staging, seed, counts, height, width, sequence_length, progress, workers)
        desc = world_description(seed, counts, height, width, sequence_length)
        (staging / "world.json").write_text(json.dumps(desc, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_in(staging, out)
    return stats


def _render(
    out: Path,
    seed: int,
    counts: dict[str, int],
    height: int,
    width: int,
    sequence_length: int,
    progress: bool,
    workers: int,
) -> dict:
    """Write every item of ``counts`` into ``out``; returns timing and counts."""
    tasks = _tasks(counts, sequence_length)
    total = sum(t[3] for t in tasks)
    bar = tqdm(total=total, disable=not progress, unit="img", desc="world")
    start = time.perf_counter()
    job = (out, seed, height, width, sequence_length)
    if workers <= 1:
        for task in tasks:
            bar.update(_write_chunk([task], *job))
    else:
        # Items draw from their own seeded generators, so the bytes do not depend on
        # which process writes what. Spawned (not forked) workers: the caller may hold
        # torch or OpenCV thread pools that do not survive a fork.
        chunks = [tasks[i : i + _CHUNK] for i in range(0, len(tasks), _CHUNK)]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, context, initializer=cv2.setNumThreads, initargs=(1,)
        ) as pool:
            futures = [pool.submit(_write_chunk, c, *job) for c in chunks]
            for future in as_completed(futures):
                bar.update(future.result())
    bar.close()
    seconds = time.perf_counter() - start
    return {"images": total, "seconds": seconds, "images_per_s": total / max(seconds, 1e-9)}
