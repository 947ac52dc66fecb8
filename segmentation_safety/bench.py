"""Timing of the segmentation pass and each detector's added cost, measured in one run.

Overheads are ratios taken in the same process, interleaved round by round, so machine
load affects numerator and denominator alike. Weights do not change timing, so a
detector whose trained parts are absent is timed with its untrained modules and marked.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from segmentation_safety.detectors import Detector
from segmentation_safety.device import synchronize
from segmentation_safety.models.segmenter import Segmenter

#: Overhead budgets of DESIGN.md §7 (at 512×1024, over the segmentation pass of the same
#: run). Resynthesis's budget covers its anomaly and failure maps together; MC dropout
#: has none.
BUDGETS: dict[str, float] = {
    **dict.fromkeys(("max_softmax", "entropy", "max_logit", "energy", "sml"), 0.03),
    "densehybrid": 0.03,
    "flowenedet_u": 0.10,
    "flowenedet_c": 0.10,
    "flow_density": 0.25,
    "resynthesis": 2.0,
    "resynthesis_anomaly": 2.0,
}


@dataclass
class DetectorTiming:
    ms: float  # median added time per frame
    overhead: float  # ms / segmentation_ms
    trained: bool = True
    note: str = ""
    budget: float | None = None  # DESIGN §7 overhead budget, where it names one

    @property
    def within_budget(self) -> bool | None:
        return None if self.budget is None else self.overhead <= self.budget


@dataclass
class BenchReport:
    device: str
    height: int
    width: int
    segmenter: str
    segmentation_ms: float
    repeats: int
    half: bool = False  # fp16 autocast (CUDA only, as the node runs there)
    detectors: dict[str, DetectorTiming] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it was not timed

    def to_json(self) -> dict:
        """The DESIGN.md §5.2 keys (plus a few extra fields)."""
        out = asdict(self)
        out["detectors"] = {
            n: {**asdict(t), "within_budget": t.within_budget} for n, t in self.detectors.items()
        }
        return out


def bench(
    segmenter: Segmenter,
    detectors: dict[str, Detector],
    height: int,
    width: int,
    device: torch.device,
    repeats: int = 10,
    warmup: int = 2,
    untrained: Sequence[str] = (),
    segmenter_name: str = "",
    progress: Callable[[int, int], None] | None = None,
    half: bool = True,
) -> BenchReport:
    """Median per-frame times at ``height``×``width`` on ``device`` (batch of one).

    The segmentation pass is normalisation, the network, logits upsampled to the input
    size and the argmax: what publishing a segmentation costs. A detector's time is its
    forward on that pass's outputs plus upsampling its maps to the input size. On CUDA
    both run under fp16 autocast unless ``half`` is false, as in the pipeline.
    """
    half = half and device.type == "cuda"
    segmenter = segmenter.to(device).eval()
    detectors = {n: d.to(device).eval() for n, d in detectors.items()}
    # A frame as Pipeline.to_input delivers it: H×W×3 memory seen as 3×H×W, so the
    # networks run channels-last exactly as in the node (about 2× faster on CPU than a
    # contiguous 3×H×W tensor, which would understate every overhead).
    image = torch.randint(0, 256, (1, height, width, 3), dtype=torch.uint8, device=device)
    image = image.permute(0, 3, 1, 2)
    taps = sorted({t for d in detectors.values() for t in d.embeddings})
    size = (height, width)

    def seg_pass() -> object:
        x = segmenter.normalize(image)
        out = segmenter(x, taps)
        F.interpolate(out.logits, size=size, mode="bilinear", align_corners=False).argmax(1)
        return out

    def det_pass(det: Detector, seg: object) -> None:
        o = det(seg)
        # A map returned as both outputs (FlowEneDet) is resized once, as the pipeline does.
        maps = {id(m): m for m in (o.anomaly, o.failure) if m is not None}
        for m in maps.values():
            if tuple(m.shape[-2:]) != size:
                F.interpolate(m.unsqueeze(1).float(), size=size, mode="bilinear")

    seg_times: list[float] = []
    det_times: dict[str, list[float]] = {n: [] for n in detectors}
    total = warmup + repeats
    autocast = torch.autocast(device_type=device.type, dtype=torch.float16, enabled=half)
    with torch.inference_mode(), autocast:
        for i in range(total):
            synchronize(device)
            t0 = time.perf_counter()
            seg = seg_pass()
            synchronize(device)
            t1 = time.perf_counter()
            if i >= warmup:
                seg_times.append((t1 - t0) * 1e3)
            for n, d in detectors.items():
                synchronize(device)
                t0 = time.perf_counter()
                det_pass(d, seg)
                synchronize(device)
                if i >= warmup:
                    det_times[n].append((time.perf_counter() - t0) * 1e3)
            if progress:
                progress(i + 1, total)
    seg_ms = statistics.median(seg_times)
    report = BenchReport(
        device=str(device),
        height=height,
        width=width,
        segmenter=segmenter_name or type(segmenter).__name__,
        segmentation_ms=seg_ms,
        repeats=repeats,
        half=half,
    )
    for n, ts in det_times.items():
        ms = statistics.median(ts)
        report.detectors[n] = DetectorTiming(
            ms=ms,
            overhead=ms / seg_ms,
            trained=n not in untrained,
            note="untrained weights (timing only)" if n in untrained else "",
            budget=BUDGETS.get(n),
        )
    return report
