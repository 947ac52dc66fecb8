"""Frame in, ``SafetyResult`` out: one segmenter pass shared by every configured detector.

Pure PyTorch, no ROS. The node, the evaluator, ``segsafe bench`` and the replay all go
through :class:`Pipeline`, so what is timed is what is published.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segmentation_safety.checkpoint import load_bundle
from segmentation_safety.detectors import Detector, registry
from segmentation_safety.device import resolve_device, synchronize
from segmentation_safety.label_upsampling import upsample_argmax
from segmentation_safety.models.segmenter import Segmenter, resize_map
from segmentation_safety.operating_point import SEGMENTER_PART, OperatingPoint
from segmentation_safety.types import (
    DetectorOutput,
    RenderedFrame,
    RenderOptions,
    SafetyResult,
    SegmenterOutput,
)


def _demo_models_dir() -> Path:
    """Where the shipped demo models are: the checkout's models/demo, else the colcon
    install's share/segmentation_safety/models/demo (``SEGSAFE_DEMO_MODELS`` overrides)."""
    if os.environ.get("SEGSAFE_DEMO_MODELS"):
        return Path(os.environ["SEGSAFE_DEMO_MODELS"])
    here = Path(__file__).resolve().parent.parent / "models" / "demo"
    if here.is_dir():
        return here
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        shared = Path(prefix) / "share" / "segmentation_safety" / "models" / "demo"
        if prefix and shared.is_dir():
            return shared
    return here  # absent everywhere: errors will name the checkout's path


#: Shipped demo models, used when no models directory is given.
DEMO_MODELS = _demo_models_dir()
ALL_OUTPUTS = frozenset({"anomaly", "failure", "class_iou"})

#: The dtype of each output :meth:`Pipeline.process_frame` can compute into a caller's array.
INTO_DTYPES = {"labels": np.uint8, "color": np.uint8, "overlay": np.uint8,
               "anomaly": np.float32, "failure": np.float32, "open_set": np.uint8}  # fmt: skip
#: How frames are resized to the network's input (:func:`resize_input`).
INPUT_RESIZES = ("pil", "fast")


@dataclass
class PipelineConfig:
    """Which detectors fill which output, and how the network is run.

    ``anomaly``/``failure``/``class_iou`` name the detector that fills each output of
    :class:`SafetyResult` (``None``: not produced). ``extra`` lists further detectors
    whose maps are returned in ``SafetyResult.per_detector`` (evaluation, bench).
    """

    anomaly: str | None = "max_softmax"
    failure: str | None = None
    class_iou: str | None = None
    extra: tuple[str, ...] = ()
    device: str = "auto"
    #: Network input (H, W); None keeps the image size (``from_models_dir`` fills it from
    #: the segmenter bundle's ``input_size``). Maps come back at the image size.
    input_size: tuple[int, int] | None = None
    #: "pil" (PIL's pixels, as the public checkpoints were evaluated) or "fast" (torch's
    #: uint8 kernel on the CPU, a level or two off PIL on a few % of pixels): see
    #: :func:`resize_input`.
    input_resize: str = "pil"
    #: fp16 autocast on CUDA (ignored on CPU).
    half: bool = True
    detector_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def detector_names(self) -> list[str]:
        names = [n for n in (self.anomaly, self.failure, self.class_iou) if n]
        return list(dict.fromkeys([*names, *self.extra]))


class Pipeline:
    """A segmenter and its detectors on one device."""

    def __init__(
        self,
        segmenter: Segmenter,
        detectors: dict[str, Detector],
        config: PipelineConfig | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.config = config or PipelineConfig()
        check_input_resize(self.config.input_resize, "input_resize")
        self.device = resolve_device(self.config.device)
        self.segmenter = segmenter.to(self.device).eval()
        self.detectors = {n: d.to(self.device).eval() for n, d in detectors.items()}
        for role in ("anomaly", "failure", "class_iou"):
            name = getattr(self.config, role)
            if name is None:
                continue
            if name not in self.detectors:
                raise ValueError(f"{role} detector {name!r} is not among the pipeline's detectors")
            if role not in self.detectors[name].produces:
                raise ValueError(
                    f"detector {name!r} cannot fill {role!r}: it produces "
                    f"{sorted(self.detectors[name].produces)}"
                )
        k = segmenter.num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(k)]
        self._named_classes = list(class_names or [])  # what the colours are chosen by

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_models_dir(
        cls, models_dir: str | os.PathLike[str] | None = None, config: PipelineConfig | None = None
    ) -> Pipeline:
        """Load ``segmenter.safetensors`` and each detector's parts from ``models_dir``.

        A missing or mismatched bundle raises :class:`BundleError` naming the file.
        """
        from segmentation_safety.models.zoo import load_segmenter

        config = config or PipelineConfig()
        root = Path(models_dir) if models_dir else DEMO_MODELS
        segmenter, seg_bundle = load_segmenter(part_path(root, "segmenter"))
        if config.input_size is None and seg_bundle.metadata.get("input_size"):
            # The size the network was trained at: other sizes score worse.
            config = replace(config, input_size=tuple(seg_bundle.metadata["input_size"]))
        detectors = {}
        for name in config.detector_names():
            options = config.detector_options.get(name, {})
            detector = load_parts(registry.build(name, segmenter, **options), root)
            if detector.calibration_part() == SEGMENTER_PART:
                detector.operating_point = OperatingPoint.from_metadata(seg_bundle.metadata, name)
            detectors[name] = detector
        return cls(segmenter, detectors, config, seg_bundle.metadata.get("class_names"))

    # -- running --------------------------------------------------------------------
    def to_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 H×W×3 or B×H×W×3 RGB (numpy or tensor) -> B×3×H×W on the device."""
        with warnings.catch_warnings():
            # A frame read in place from a message is read-only; nothing here writes to
            # its pixels (the overlay starts from a copy), so no copy is made for torch.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.as_tensor(images)
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4 or t.shape[-1] != 3:
            raise ValueError(f"expected an H×W×3 or B×H×W×3 RGB image, got shape {tuple(t.shape)}")
        if t.shape[1] == 0 or t.shape[2] == 0:
            raise ValueError(f"empty image of shape {tuple(t.shape)}")
        return t.to(self.device, non_blocking=True).permute(0, 3, 1, 2)

    @torch.inference_mode()
    def run(
        self,
        images: torch.Tensor,
        detectors: Iterable[str] | None = None,
        class_max_in_pass: bool = False,
    ) -> tuple[SegmenterOutput, dict[str, DetectorOutput], dict[str, float]]:
        """One segmenter pass and the chosen detectors on a B×3×H×W uint8/[0,255] batch.

        Returns the raw outputs (network resolution) and per-stage timings in ms.
        ``class_max_in_pass`` computes the class max (the labels' argmax, which max_logit
        and max_softmax share) in the ``segmenter`` stage: the bench does, so that no
        detector is charged for what a segmentation needs anyway.
        """
        names = list(self.detectors if detectors is None else detectors)
        timings: dict[str, float] = {}
        with self._timed(timings, "preprocess"):
            size = self.config.input_size
            if size and tuple(images.shape[-2:]) != (int(size[0]), int(size[1])):
                images = resize_input(images, size, self.config.input_resize)
            x = self.segmenter.normalize(images)
        taps = sorted({t for n in names for t in self.detectors[n].embeddings})
        with self._timed(timings, "segmenter"), self._autocast():
            seg = self.segmenter(x, taps)
            if class_max_in_pass:
                seg.class_max()
        outs = {}
        for n in names:
            with self._timed(timings, f"detector/{n}"), self._autocast():
                outs[n] = self.detectors[n](seg)
        return seg, outs, timings

    def process(
        self, image: np.ndarray | torch.Tensor, outputs: Iterable[str] = ALL_OUTPUTS
    ) -> SafetyResult:
        """One RGB uint8 H×W×3 frame -> maps at the frame's resolution on the host."""
        return self.process_batch(image, outputs)[0]

    def process_batch(
        self, images: np.ndarray | torch.Tensor, outputs: Iterable[str] = ALL_OUTPUTS
    ) -> list[SafetyResult]:
        wanted = set(outputs)
        roles = {r: getattr(self.config, r) for r in ALL_OUTPUTS if r in wanted}
        names = [n for n in dict.fromkeys(roles.values()) if n]
        if "per_detector" in wanted:
            names = list(dict.fromkeys([*names, *self.config.extra]))
        t0 = time.perf_counter()
        x = self.to_input(images)
        size = tuple(x.shape[-2:])
        seg, outs, timings = self.run(x, names)
        with self._timed(timings, "postprocess"):
            # argmax of the logits is the argmax of the softmax: no K×H×W softmax per frame
            labels = upsample_argmax(seg.logits.float(), size, seg.argmax())
            maps: dict[str, dict[str, torch.Tensor]] = {}
            for n, o in outs.items():
                maps[n] = {}
                resized: dict[int, torch.Tensor] = {}  # FED returns one map as both outputs
                for kind in ("anomaly", "failure"):
                    m = getattr(o, kind)
                    if m is not None:
                        if id(m) not in resized:
                            resized[id(m)] = resize_map(m.float().unsqueeze(1), size).squeeze(1)
                        maps[n][kind] = resized[id(m)]
                if o.class_iou is not None:
                    maps[n]["class_iou"] = o.class_iou.float()
            host = {n: {k: v.cpu().numpy() for k, v in d.items()} for n, d in maps.items()}
            labels_np = labels.to(torch.uint8).cpu().numpy()
        timings["total"] = (time.perf_counter() - t0) * 1e3
        results = []
        for b in range(labels_np.shape[0]):

            def pick(role: str, b: int = b) -> np.ndarray | None:
                name = roles.get(role)
                arr = host.get(name, {}).get(role) if name else None
                return None if arr is None else np.ascontiguousarray(arr[b])

            results.append(
                SafetyResult(
                    labels=labels_np[b],
                    anomaly=pick("anomaly"),
                    failure=pick("failure"),
                    class_iou=pick("class_iou"),
                    timings_ms=dict(timings),
                    per_detector={n: {k: v[b] for k, v in d.items()} for n, d in host.items()},
                )
            )
        return results

    @torch.inference_mode()
    def process_frame(
        self,
        image: np.ndarray | torch.Tensor,
        outputs: Iterable[str],
        render: RenderOptions,
        into: Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]] | None = None,
    ) -> RenderedFrame:
        """One RGB uint8 H×W×3 frame -> what a node publishes (``render``), on the host.

        Everything after the network (resizing, argmax, colours, overlay, alarm counts)
        runs on the pipeline's device, and only the finished outputs leave it, in one
        copy. At ``map_scale`` 1 the maps are those of :meth:`process` (same resize).

        ``into``: host arrays to compute outputs into ("labels", "color", "overlay",
        "anomaly", "failure", "open_set"; each C-contiguous, of the output's shape and
        dtype), e.g. the pixels of the messages a node serialises, which then copies
        nothing; or a function giving them, called once the network has run. Used on the
        CPU only; an array that does not fit is left alone, and the output is where the
        returned frame's field says.
        """
        from segmentation_safety import device_jpeg
        from segmentation_safety import render as draw

        wanted = set(outputs)
        roles = {r: getattr(self.config, r) for r in ALL_OUTPUTS if r in wanted}
        names = [n for n in dict.fromkeys(roles.values()) if n]
        t0 = time.perf_counter()
        x = self.to_input(image)
        if x.shape[0] != 1:
            raise ValueError("process_frame takes one frame")
        size = tuple(x.shape[-2:])
        small = map_size(size, render.map_scale)
        seg, outs, timings = self.run(x, names)
        with self._timed(timings, "postprocess"):
            shapes = {"labels": (*size,), "color": (*size, 3), "overlay": (*size, 3),
                      "anomaly": small, "failure": small, "open_set": (*size,)}  # fmt: skip
            dst = _destinations(into() if callable(into) else into, shapes, self.device)
            logits = seg.logits.float()
            net_maps = {}
            for role in ("anomaly", "failure"):
                o = outs.get(roles.get(role) or "")
                if o is not None and getattr(o, role) is not None:
                    net_maps[role] = getattr(o, role)
            resized: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

            def at(role: str, shape: tuple[int, ...]) -> torch.Tensor:
                # FED returns one map as both outputs: resized once per destination.
                m = net_maps[role]
                target = dst.get(role) if shape == small and role in render.maps else None
                key = (id(m), shape, None if target is None else role)
                if key not in resized:
                    target = None if target is None else target.view(1, 1, *shape)
                    resized[key] = resize_map(m[:1].float().unsqueeze(1), shape, target)[0, 0]
                return resized[key]

            dev: dict[str, torch.Tensor] = {}
            labels = None
            if render.labels or render.color:
                target = dst.get("labels") if render.labels else None
                target = None if target is None else target.unsqueeze(0)
                labels = upsample_argmax(logits, size, seg.argmax(), target)[0]
                if render.labels:
                    dev["labels"] = labels.to(torch.uint8)
                if render.color:
                    dev["color"] = draw.colorize(labels, self._palette(), dst.get("color"))
            for role in render.maps & net_maps.keys():
                dev[role] = at(role, small)
            jpeg_error = None
            above = None  # the full-size anomaly's pixels above the threshold, where listed
            if render.overlay or render.overlay_jpeg is not None:
                rgb = x[0].permute(1, 2, 0)
                if "anomaly" in net_maps:
                    span = draw.map_range(net_maps["anomaly"][0])
                    target = dst.get("overlay") if render.overlay else None
                    full = at("anomaly", size)
                    above = draw.flat_above(full, render.threshold)
                    rgb = draw.hazard_overlay(
                        rgb, full, render.threshold, span, into=target, flagged=above
                    )
                if render.overlay:
                    dev["overlay"] = rgb
                if render.overlay_jpeg is not None:
                    try:
                        dev["overlay_jpeg"] = device_jpeg.encode(rgb, render.overlay_jpeg)
                    except RuntimeError as e:  # the frame's other outputs must not be lost
                        dev["overlay"] = rgb  # for the caller to encode (overlay_jpeg None)
                        jpeg_error = f"{type(e).__name__}: {e}"
            if render.open_set is not None and "anomaly" in net_maps:
                if labels is None:
                    labels = upsample_argmax(logits, size, seg.argmax())[0]
                k = self.segmenter.num_classes
                dev["open_set"] = draw.open_set(
                    labels, at("anomaly", size), render.open_set, k, dst.get("open_set")
                )
            if render.anomaly_net and "anomaly" in net_maps:
                dev["anomaly_net"] = net_maps["anomaly"][0].float()
            name = roles.get("class_iou")
            if name and outs[name].class_iou is not None:
                dev["class_iou"] = outs[name].class_iou[0].float()
            alarm = None
            if render.alarm is not None:
                if labels is None or small != size:
                    labels = upsample_argmax(logits, small, seg.argmax())[0]
                alarm = draw.alarm_counts(
                    labels,
                    at("anomaly", small) if "anomaly" in net_maps else None,
                    at("failure", small) if "failure" in net_maps else None,
                    render.threshold,
                    render.alarm,
                    render.alarm_region,
                    above=above if small == size else None,
                )
            if net_maps:  # summed on the device, copied with the outputs
                dev["map_sums"] = torch.stack(
                    [torch.sum(m[:1], dtype=torch.float32) for m in net_maps.values()]
                )
            host = to_host(dev)
            nonfinite = {}
            if net_maps:
                sums = host.pop("map_sums").tolist()
                nonfinite = {
                    role: _nonfinite(net_maps[role][:1], total)
                    for role, total in zip(net_maps, sums, strict=True)
                }
        timings["total"] = (time.perf_counter() - t0) * 1e3
        return RenderedFrame(
            nonfinite=nonfinite,
            labels=host.get("labels"),
            color=host.get("color"),
            overlay=host.get("overlay"),
            anomaly=host.get("anomaly"),
            failure=host.get("failure"),
            class_iou=host.get("class_iou"),
            alarm=alarm,
            open_set=host.get("open_set"),
            anomaly_net=host.get("anomaly_net"),
            overlay_jpeg=host.get("overlay_jpeg"),
            overlay_jpeg_error=jpeg_error,
            timings_ms=timings,
        )

    def open_set_threshold(self) -> float | None:
        """The anomaly detector's open-set threshold: DenseHybrid's calibrated one (95% TPR
        on held-out negatives, in its bundle), else its operating point; None without."""
        detector = self.detectors.get(self.config.anomaly or "")
        if detector is None:
            return None
        calibrated = detector.open_set_threshold()
        if calibrated is not None:
            return calibrated
        point = detector.operating_point
        return None if point is None else point.threshold

    def _palette(self) -> torch.Tensor:
        if getattr(self, "_palette_t", None) is None:
            from segmentation_safety import visualize
            from segmentation_safety.render import palette_on

            palette = visualize.palette_for(self._named_classes)
            self._palette_t = palette_on(self.device, palette)
        return self._palette_t

    # -- helpers --------------------------------------------------------------------
    @contextmanager
    def _timed(self, timings: dict[str, float], stage: str):  # noqa: ANN202
        synchronize(self.device)
        t0 = time.perf_counter()
        yield
        synchronize(self.device)
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - t0) * 1e3

    @property
    def autocasts(self) -> bool:
        """Whether the network and detectors run under fp16 autocast (CUDA and ``half``)."""
        return self.device.type == "cuda" and self.config.half

    def _autocast(self) -> Any:
        return torch.autocast(
            device_type=self.device.type, dtype=torch.float16, enabled=self.autocasts
        )


def map_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """The size of the maps a frame of ``size`` gives at ``RenderOptions.map_scale``."""
    return max(1, round(int(size[0]) * scale)), max(1, round(int(size[1]) * scale))


def _destinations(
    into: Mapping[str, np.ndarray] | None, shapes: dict[str, tuple[int, ...]], device: torch.device
) -> dict[str, torch.Tensor]:
    """The caller's arrays that an output can be computed into, as tensors (see
    :meth:`Pipeline.process_frame`): on the CPU, of the output's shape, contiguous."""
    if not into or device.type != "cpu":
        return {}
    out = {}
    for key, array in into.items():
        fits = (
            key in shapes
            and array.shape == tuple(shapes[key])
            and array.dtype == INTO_DTYPES.get(key)
            and array.flags.c_contiguous
            and array.flags.writeable
        )
        if fits:
            out[key] = torch.from_numpy(array)
    return out


def _nonfinite(values: torch.Tensor, total: float) -> int:
    """How many of ``values`` are NaN or ±inf, given their sum: a finite sum has none, and
    one pass of summing costs a tenth of counting (counted only when the sum says so, or
    when finite values overflowed it)."""
    if math.isfinite(total):
        return 0
    return int(torch.count_nonzero(~torch.isfinite(values)))


def part_path(models_dir: str | os.PathLike[str], kind: str) -> Path:
    """Where a models directory keeps the bundle of ``kind``: ``<dir>/<kind>.safetensors``."""
    return Path(models_dir) / f"{kind}.safetensors"


def load_parts(detector: Detector, models_dir: str | os.PathLike[str]) -> Detector:
    """Load every trained part of ``detector`` from ``models_dir``, with the operating
    point its bundle stores; a missing or mismatched file raises :class:`BundleError`
    naming it. Returns the detector."""
    for kind in detector.trained_parts:
        path = part_path(models_dir, kind)
        bundle = load_bundle(path)
        detector.load_part(kind, bundle, path)
        if kind == detector.calibration_part():
            detector.operating_point = OperatingPoint.from_metadata(bundle.metadata, detector.name)
    return detector


def check_input_resize(method: str, what: str) -> None:
    """ValueError naming ``what`` unless ``method`` is one of INPUT_RESIZES."""
    if method not in INPUT_RESIZES:
        raise ValueError(f"{what} must be one of {', '.join(INPUT_RESIZES)}, got {method!r}")


def resize_input(images: torch.Tensor, size: Sequence[int], method: str = "pil") -> torch.Tensor:
    """B×3×H×W uint8 (or [0, 255]) images -> ``size`` (H, W) as PIL's bilinear resize,
    with which the public checkpoints were trained and evaluated: antialiased when
    shrinking, width first, then height, each pass rounded to whole intensities (half
    up); aspect ratio not kept. Pixels agree with PIL to ±1 on about 1% of them.

    Each step was measured on the 10 Road Anomaly images (ESPNetv2 s = 2.0): without the
    antialiasing filter the softmax scores move up to 0.4 AUROC points from the
    reference, and with one unrounded pass up to 0.5 AP points (the network is that
    sensitive to ±1 intensity steps).

    ``method="fast"``: uint8 frames on the CPU take torch's uint8 antialiased kernel at
    every factor, 2-4× faster than the float passes for 1280×720 -> 1024×512, with pixels
    off PIL's by 1-2 levels on 0.4-3.9% of them (Road Anomaly; docs/performance.md).
    Elsewhere both methods are the float passes, cheap on a GPU.

    Returns uint8 where the uint8 kernel resized (whole intensities, which
    ``Segmenter.normalize`` looks up in a table), float otherwise.
    """
    check_input_resize(method, "resize method")
    h, w = int(size[0]), int(size[1])
    in_h, in_w = images.shape[-2:]
    if (
        images.dtype == torch.uint8
        and images.device.type == "cpu"
        and (in_h, in_w) != (h, w)
        and (method == "fast" or (in_h, in_w) in ((2 * h, w), (h, 2 * w), (2 * h, 2 * w)))
    ):
        # Halving (a 1/8, 3/8, 3/8, 1/8 filter, exact in fixed point), torch's uint8
        # antialiased kernel (Pillow-SIMD's integer arithmetic) gives exactly the pixels
        # of the float passes below (tested), 5-8× faster. At other factors the two round
        # differently on a few pixels in 10^5 to 10^2: only "fast" takes it there.
        return F.interpolate(
            images, size=(h, w), mode="bilinear", align_corners=False, antialias=True
        )
    # Channels first: frames arrive channels-last (an Image's pixels in place), and the
    # two float passes ran about 20% slower on that layout (720p to 512×1024 on the
    # CPU: 3.9-4.3 against 3.2-3.4 ms, converting included), for the same values.
    x = images.to(torch.float32, memory_format=torch.contiguous_format)
    for step in ((x.shape[-2], w), (h, w)):
        if tuple(x.shape[-2:]) != step:
            x = F.interpolate(x, size=step, mode="bilinear", align_corners=False, antialias=True)
            x = x.add_(0.5).floor_().clamp_(0.0, 255.0)
    return x


def to_host(
    tensors: dict[str, torch.Tensor], pack: bool | None = None, pinned: bool = True
) -> dict[str, np.ndarray]:
    """Device tensors -> numpy arrays in one device-to-host copy.

    On the CPU they are host memory already (views, no copy). Elsewhere they are packed
    into one byte buffer first (``pack`` forces either way): one transfer and one
    synchronisation instead of one per output. Wider types go first so every array in
    the buffer stays aligned. From CUDA the transfer lands in page-locked memory
    (``pinned=False`` to compare): a copy to ordinary memory is staged through the
    driver's own pinned buffer in pieces, and the 8-32 MB of every output of a frame at
    512×1024 to 1024×2048 would pay for that on the compute thread. PyTorch's caching
    host allocator recycles the pinned blocks once the arrays viewing them are gone, so
    a frame does not pin fresh memory.
    """
    if not tensors:
        return {}
    items = sorted(tensors.items(), key=lambda kv: -kv[1].element_size())
    if pack is None:
        pack = any(t.device.type != "cpu" for _, t in items)
    if not pack:
        return {k: t.contiguous().numpy() for k, t in items}
    flat = [t.contiguous().reshape(-1).view(torch.uint8) for _, t in items]
    packed = _copy_to_host(torch.cat(flat), pinned)
    out, offset = {}, 0
    for (k, t), f in zip(items, flat, strict=True):
        n = f.numel()
        dtype = torch.empty(0, dtype=t.dtype).numpy().dtype
        out[k] = packed[offset : offset + n].view(dtype).reshape(tuple(t.shape))
        offset += n
    return out


def _copy_to_host(data: torch.Tensor, pinned: bool) -> np.ndarray:
    if data.device.type != "cuda" or not pinned:
        return data.cpu().numpy()
    try:
        host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
    except RuntimeError:  # page-locked memory can run out where pageable memory does not
        return data.cpu().numpy()
    host.copy_(data, non_blocking=True)
    # The copy is queued on the current stream; the arrays are read as soon as this returns.
    torch.cuda.current_stream(data.device).synchronize()
    return host.numpy()
