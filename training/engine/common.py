"""Pieces every trainer needs: data splits, segmenter bundles, evaluation, bundle writing."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate
from tqdm import tqdm

from segmentation_safety.checkpoint import save_bundle
from segmentation_safety.detectors.base import Detector
from segmentation_safety.errors import MissingFileError, UserError
from segmentation_safety.models.segmenter import Segmenter
from segmentation_safety.models.zoo import load_segmenter  # noqa: F401  (engine API)
from segmentation_safety.types import SegmenterOutput
from training.datasets import ade20k
from training.datasets.common import read_rgb
from training.engine.loop import (
    LoopConfig,
    RunContext,
    SampleStream,
    Trainable,
    _to_device,
    checkpoint_path,
    fit,
    sample_generator,
)
from training.engine.transforms import random_scale_crop_flip, to_tensors


class DataError(UserError, ValueError):
    """A data directory or split that cannot be trained on; the message names it."""


#: Config keys a resumed run may change: how long, how often it reports, where it runs.
RESUMABLE_CHANGES = frozenset(
    {"iterations", "checkpoint_every", "log_every", "workers", "device", "eval_max_images"}
)


def loop_config(
    config: dict[str, Any], args: argparse.Namespace, inputs: dict[str, Any] | None = None
) -> LoopConfig:
    """The engine's loop settings from a trainer config and the CLI arguments.

    ``inputs``: what else the run is made of (the bundles it starts from, its negatives):
    a resume under other ones would mix two runs, so they are part of its identity."""
    identity: dict[str, Any] = {
        "config": {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}
    }
    if getattr(args, "data", None) is not None:
        identity["data"] = str(Path(args.data).resolve())
    identity.update(inputs or {})
    return LoopConfig(
        restart=bool(getattr(args, "restart", False)),
        identity=identity,
        iterations=int(config["iterations"]),
        out=Path(args.out),
        resume=bool(getattr(args, "resume", False)),
        checkpoint_every=int(config["checkpoint_every"]),
        log_every=int(config["log_every"]),
        grad_clip=float(config.get("grad_clip", 0.0) or 0.0),
        workers=int(config.get("workers", 0)),
        stop_after=getattr(args, "stop_after", None),
    )


def constant_adam(
    params: Any, config: dict[str, Any]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam with ``config``'s lr, weight_decay (and betas, where the config has them) and a
    constant learning rate."""
    extra = {}
    if config.get("betas") is not None:
        extra["betas"] = (float(config["betas"][0]), float(config["betas"][1]))
    optimizer = torch.optim.Adam(
        params, lr=float(config["lr"]), weight_decay=float(config["weight_decay"]), **extra
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def run_stage(
    ctx: RunContext,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    make_sample: Callable[[int, torch.Generator], Any],
    n_items: int,
    config: dict[str, Any],
    args: argparse.Namespace,
    desc: str,
    *,
    data_init: bool = False,
    fresh_without_checkpoint: bool = False,
    inputs: dict[str, Any] | None = None,
) -> bool:
    """Train ``module`` on a seeded stream over ``n_items`` dataset items with ``fit``.

    The stream takes ``config``'s batch_size and seed, the loop :func:`loop_config`.
    ``data_init``: before a fresh (not resumed) run, one forward pass in train mode over
    the first *global* batch, identical on every rank (data-dependent initialisation
    such as ActNorm's). ``fresh_without_checkpoint``: ``--resume`` starts a stage that
    has no checkpoint yet afresh. Returns True when every iteration is done; False when
    ``--stop-after`` cut it short (the trainer's ``open_run`` block closes the run).
    """
    stream = SampleStream(n_items, int(config["batch_size"]), int(config["seed"]))
    # The data is named by its path; its size tells a dataset re-made there (another
    # world rendered into the same folder) from the one the run started on.
    loop = loop_config(config, args, {"data_items": n_items, **(inputs or {})})
    if fresh_without_checkpoint:
        loop.resume = loop.resume and checkpoint_path(loop.out).is_file()
    if data_init and not loop.resume:
        positions = range(stream.batch_size * ctx.world_size)
        first = [make_sample(stream.index(p), sample_generator(stream.seed, p)) for p in positions]
        with torch.no_grad():
            module.train()
            module(_to_device(default_collate(first), ctx.device))
    done = fit(ctx, Trainable(module, optimizer, scheduler), stream, make_sample, loop, desc)
    return done


# --------------------------------------------------------------------------- data


def bundle_identity(path: str | os.PathLike[str]) -> str:
    """A bundle file as a run's input: its content's sha256 (another file at the same
    path, e.g. a segmenter fine-tuned since, is another input)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def open_split(root: str | os.PathLike[str], split: str) -> Sequence[dict[str, Any]]:
    """The ``split`` of the Cityscapes-layout dataset under ``root``.

    Items are dicts with ``image`` (uint8 H×W×3) and ``label`` (uint8 train ids, 255
    void). A missing directory or an empty split raises a DataError naming the path.
    """
    from training.datasets.cityscapes import Cityscapes

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    try:
        dataset = Cityscapes(root, split)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise DataError(f"data directory {root}: cannot read split {split!r}: {e}") from None
    if len(dataset) == 0:
        raise DataError(f"data directory {root}: split {split!r} has no images")
    return dataset


def sample_tensors(item: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset item -> (3×H×W uint8 image, H×W int64 label) tensors."""
    return to_tensors(item["image"], item.get("label"))


def decoy_targets(
    scenes: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image, target) pairs from streets with decoys (:class:`NegativeScenes` items) as
    rendered: target 1 on decoys, 0 on the rest, 255 where the label is void."""
    for i in range(len(scenes)):
        image, label, decoys = scenes[i]
        target = torch.where(label == 255, 255, 0)
        target[decoys] = 1
        yield image, target


def augmented_samples(
    dataset: Sequence[dict[str, Any]],
    config: dict[str, Any],
    load: Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]] = sample_tensors,
) -> Callable[[int, torch.Generator], dict[str, torch.Tensor]]:
    """``make_sample(index, generator)`` for the engine: ``load`` the item (by default
    :func:`sample_tensors`), then random rescale / crop / flip with ``config``'s
    crop_size (none: the image's size), scale_range and flip -> ``{"image", "label"}``."""

    def make_sample(index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        image, label = load(dataset[index])
        crop = config["crop_size"] or image.shape[-2:]
        image, label = random_scale_crop_flip(
            image, label, generator, crop, config["scale_range"], float(config["flip"])
        )
        return {"image": image, "label": label}

    return make_sample


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of ``range(n)`` into (kept, held out) with ``fraction`` held out."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_out = min(n - 1, max(1, round(n * fraction))) if n > 1 else 0
    return sorted(order[n_out:]), sorted(order[:n_out])


# --------------------------------------------------------------------------- segmenters


def segmenter_path(config: dict[str, Any], out: str | os.PathLike[str]) -> Path:
    """``config["segmenter"]``, else ``segmenter.safetensors`` beside ``out`` (models dir);
    a missing one is refused saying where it was looked for and how to make one."""
    given = bool(config.get("segmenter"))
    path = Path(config["segmenter"]) if given else Path(out).parent / "segmenter.safetensors"
    if not path.is_file():
        where = "the config's `segmenter:`" if given else "by default, beside --out"
        raise MissingFileError(
            f"no segmenter bundle at {path} ({where}): this model is fitted on a trained "
            f"segmenter; train one (`segsafe train segmenter --data W --out {path}`), or "
            "name yours with `segmenter:` in --config"
        )
    return path


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode (dropout off, BN statistics fixed)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


@torch.no_grad()
def evaluate_segmentation(
    segmenter: Segmenter,
    dataset: Sequence[dict[str, Any]],
    device: torch.device,
    max_images: int | None = None,
    indices: Sequence[int] | None = None,
) -> dict[str, float]:
    """Closed-set mIoU and pixel accuracy on full images (one at a time)."""
    from segmentation_safety.metrics import ConfusionMatrix

    was_training = segmenter.training
    segmenter.eval()
    confusion = ConfusionMatrix(segmenter.num_classes)
    chosen = list(indices) if indices is not None else list(range(len(dataset)))
    # A full-size pass per image: minutes on real data, so it shows its progress.
    for i in tqdm(chosen[:max_images], desc="val mIoU", unit="img", leave=False, file=sys.stderr):
        image, label = sample_tensors(dataset[i])
        logits = predict_logits(segmenter, image, device)
        confusion.update(logits.argmax(1)[0].cpu().numpy(), label.numpy())
    segmenter.train(was_training)
    scores = confusion.compute()
    return {"miou": scores.miou, "pixel_accuracy": scores.pixel_accuracy}


@torch.no_grad()
def scored_samples(
    segmenter: Segmenter,
    score: Callable[[SegmenterOutput], torch.Tensor],
    samples: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    desc: str = "scoring",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(score map resized to the target, on the CPU; target) for each (3×H×W uint8
    image, H×W target) pair: the segmenter in eval mode, one image at a time, and
    ``score`` turning its output into a B×h×w map (a detector's anomaly, say)."""
    segmenter.eval()
    for image, target in tqdm(samples, desc=desc, unit="img", leave=False, file=sys.stderr):
        out = segmenter(segmenter.normalize(image[None].to(device)))
        m = score(out)[:, None].float()
        m = nn.functional.interpolate(m, size=target.shape, mode="bilinear", align_corners=False)
        yield m[0, 0].cpu(), target


def predict_logits(segmenter: Segmenter, image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """1×K×H×W logits at the image's resolution for one 3×H×W uint8 image."""
    x = segmenter.normalize(image[None].to(device))
    logits = segmenter(x).logits.float()
    return nn.functional.interpolate(
        logits, size=image.shape[-2:], mode="bilinear", align_corners=False
    )


# --------------------------------------------------------------------------- bundles


def training_metadata(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """What every bundle records about how it was trained."""
    return {"config": config, "data": str(Path(args.data).resolve()), "model": args.model}


def write_part_bundle(
    ctx: RunContext,
    args: argparse.Namespace,
    config: dict[str, Any],
    detector: Detector,
    kind: str,
    segmenter_path: str | os.PathLike[str],
    segmenter_metadata: dict[str, Any],
    metrics: dict[str, Any],
    **extra: Any,
) -> None:
    """Write ``detector``'s part ``kind`` to ``args.out`` with the metadata every
    detector trainer records: the training run, the segmenter it was fitted on (its
    path, and its bundle's metadata as loaded for training), its metrics, and ``extra``
    keys."""
    tensors, metadata = detector.export_part(kind)
    training = training_metadata(config, args)
    training["segmenter"] = str(segmenter_path)
    inherited = segmenter_context(segmenter_metadata)
    metadata.update({**inherited, "training": training, "metrics": metrics, **extra})
    write_bundle(ctx, args.out, tensors, metadata)


#: What a part bundle repeats from its segmenter's (DESIGN §5.4: every bundle carries
#: class names, normalisation and input size), so it reads on its own.
SEGMENTER_CONTEXT = ("class_names", "mean", "std", "input_size")


def segmenter_context(segmenter_metadata: dict[str, Any]) -> dict[str, Any]:
    """The SEGMENTER_CONTEXT keys a segmenter bundle's metadata has."""
    return {k: segmenter_metadata[k] for k in SEGMENTER_CONTEXT if k in segmenter_metadata}


def write_bundle(
    ctx: RunContext,
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, Any],
) -> None:
    """``save_bundle`` on rank 0 only (every rank holds the same weights)."""
    if ctx.is_main:
        save_bundle(path, tensors, _jsonable(metadata))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _read_rgb(path: Path) -> torch.Tensor | None:
    """3×H×W uint8 RGB tensor of an image file, or None when it cannot be read."""
    try:
        rgb = read_rgb(path)
    except OSError:  # missing, truncated or not an image
        return None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


#: The layouts a folder of negatives may have, as errors list them.
NEGATIVE_LAYOUTS = (
    "the synthetic world's negatives/: images/*.png with masks/*.png (instance ids)",
    ade20k.LAYOUT + ", split training",
)


class NegativeImages:
    """RGB images with instance masks to paste on inlier crops (DenseHybrid).

    The folder is ``folder``, or the world's ``<root>/negatives`` without one, in either
    layout, recognised by its folders:

    - the world's: ``images/<name>.png`` (RGB) and ``masks/<name>.png`` (instance ids,
      0 = background); a missing mask means "rectangle pasting only";
    - ADE20k's release, the paper's negatives (§7.4): its training split, read by
      ``ADE20KInstances`` (``annotations_instance``: red = category, green = instance).

    Both give the same samples, so pasting takes a rectangle or the union of the
    instances of either.
    """

    def __init__(
        self, root: str | os.PathLike[str], folder: str | os.PathLike[str] | None = None
    ) -> None:
        self.root = Path(folder) if folder is not None else Path(root) / "negatives"
        if not self.root.is_dir():
            raise self._refusal(f"no folder of negatives at {self.root}")
        self.ade20k: ade20k.ADE20KInstances | None = None
        release = ade20k.release_root(self.root)
        if release is not None:
            # Count first: the loader's own "no samples" error would not name the folder.
            if not any((release / "images" / "training").glob("*.jpg")):
                raise self._refusal(f"no images in {release / 'images' / 'training'}")
            self.ade20k = ade20k.ADE20KInstances(release, "training")
            self.images = list(self.ade20k.items)
        else:
            self.images = sorted((self.root / "images").glob("*.png"))
        if not self.images:
            raise self._refusal(f"no negative images in {self.root}")
        self.layout = "ade20k" if self.ade20k is not None else "world"

    def _refusal(self, problem: str) -> DataError:
        layouts = "; ".join(NEGATIVE_LAYOUTS)
        return DataError(
            f"{problem} (DenseHybrid, and flow density's combine: logreg, paste them; "
            f"--negatives DIR names them); layouts accepted: {layouts}"
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(3×h×w uint8 image, h×w int64 instance ids or None)."""
        import cv2

        path = self.images[index]
        if self.ade20k is not None:
            try:
                sample = self.ade20k[index]
            except OSError as e:  # truncated, not an image, or no annotation
                raise DataError(f"cannot read negative image {path}: {e}") from None
            image = torch.from_numpy(sample["image"]).permute(2, 0, 1).contiguous()
            return image, torch.from_numpy(sample["instances"]).long()
        image = _read_rgb(path)
        if image is None:
            raise DataError(f"cannot read negative image {path}")
        mask_path = self.root / "masks" / path.name
        mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED) if mask_path.is_file() else None
        return image, None if mask is None else torch.from_numpy(mask).long()


def scene_negatives_dir(root: str | os.PathLike[str]) -> Path:
    """Where a synthetic world keeps its streets with decoys."""
    return Path(root) / "negatives" / "scenes"


def has_scene_negatives(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` has streets with decoys (only a synthetic world does)."""
    return any((scene_negatives_dir(root) / "images").glob("*.png"))


class NegativeScenes:
    """The world's ``negatives/scenes/``: streets with decoys (DenseHybrid scene negatives).

    ``images/<name>.png`` (RGB), ``labels/<name>.png`` (train ids, void on decoys) and
    ``masks/<name>.png`` (1 on decoys). Every image needs both label files.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = scene_negatives_dir(root)
        self.images = sorted((self.root / "images").glob("*.png"))
        if not self.images:
            raise DataError(
                f"no scene negatives in {self.root / 'images'}: render the world again with "
                "this version of `segsafe world`, or set scene_probability: 0"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(3×H×W uint8 image, H×W int64 train ids, H×W bool decoy mask)."""
        import cv2

        path = self.images[index]
        image = _read_rgb(path)
        label = cv2.imread(str(self.root / "labels" / path.name), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(self.root / "masks" / path.name), cv2.IMREAD_UNCHANGED)
        if image is None or label is None or mask is None:
            raise DataError(f"cannot read scene negative {path} with its labels and mask")
        if label.shape != image.shape[1:] or mask.shape != image.shape[1:]:
            raise DataError(f"scene negative {path}: labels or mask do not match the image size")
        return image, torch.from_numpy(label).long(), torch.from_numpy(mask > 0)
