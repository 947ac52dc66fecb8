"""The CUDA path: every detector on the GPU agrees with the CPU, fp16 autocast included.

Skipped where CUDA is absent (CI has no GPU); run by hand on a GPU machine with
``python -m pytest test/test_cuda.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segmentation_safety import visualize
from segmentation_safety.bench import bench
from segmentation_safety.detectors import registry
from segmentation_safety.pipeline import DEMO_MODELS, Pipeline, PipelineConfig
from segmentation_safety.types import RenderOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

# MC dropout samples its own masks on each device, so its maps are not comparable.
DETECTORS = [n for n in registry.available() if n != "mc_dropout"]


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    import cv2

    from training.world import write_world

    root = tmp_path_factory.mktemp("world")
    write_world(root, seed=7, train=0, val=0, anomaly=2, sequences=0, negatives=0,
                height=256, width=512, progress=False)  # fmt: skip
    paths = sorted((root / "anomaly" / "images").glob("*.png"))
    return np.stack([cv2.imread(str(p))[..., ::-1] for p in paths])


def _pipeline(device: str, half: bool) -> Pipeline:
    config = PipelineConfig(device=device, half=half, extra=tuple(DETECTORS))
    return Pipeline.from_models_dir(DEMO_MODELS, config)


def _maps(pipe: Pipeline, frames: np.ndarray) -> list:
    return pipe.process_batch(frames, outputs=("labels", "per_detector"))


def _rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    # Ties (plateaus such as MSP = 1) get averaged ranks, so the result is repeatable.
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16-autocast"])
def test_every_detector_on_cuda_matches_the_cpu(frames, half):
    cpu = _maps(_pipeline("cpu", False), frames)
    gpu = _maps(_pipeline("cuda", half), frames)
    # fp32 differs from the CPU by summation order only; fp16 by rounding too.
    min_agree, min_rank = (0.999, 0.999) if not half else (0.99, 0.98)
    for c, g in zip(cpu, gpu, strict=True):
        assert (c.labels == g.labels).mean() >= min_agree
        assert set(c.per_detector) == set(g.per_detector) == set(DETECTORS)
        for name, maps in c.per_detector.items():
            for kind, ref in maps.items():
                got = g.per_detector[name][kind]
                assert got.shape == ref.shape and got.dtype == ref.dtype, (name, kind)
                assert np.isfinite(got).all(), (name, kind, "non-finite values")
                if kind == "class_iou":
                    assert np.abs(got - ref).max() < (1e-3 if not half else 2e-2), name
                else:
                    assert _rank_corr(got, ref) >= min_rank, (name, kind)


def test_bench_on_cuda_times_fp16_autocast_by_default():
    seg_pipe = _pipeline("cuda", True)
    dets = {n: seg_pipe.detectors[n] for n in ("max_softmax", "densehybrid", "flowenedet_u")}
    device = torch.device("cuda")
    dtypes = []
    hook = seg_pipe.segmenter.register_forward_hook(lambda m, i, o: dtypes.append(o.logits.dtype))
    try:
        report = bench(seg_pipe.segmenter, dets, 128, 256, device, repeats=2, warmup=1)
        assert report.half and report.device.startswith("cuda")
        assert set(report.detectors) == set(dets)
        assert set(dtypes) == {torch.float16}  # the network really ran under autocast
        dtypes.clear()
        fp32 = bench(seg_pipe.segmenter, dets, 128, 256, device, repeats=2, warmup=1, half=False)
        assert not fp32.half and set(dtypes) == {torch.float32}
    finally:
        hook.remove()


def _node_outputs(device: str, half: bool, frames: np.ndarray, threshold: float) -> list:
    """What the node publishes for each frame (``process_frame``: colours, overlay, maps
    and alarm counts made on the device, copied to the host in one packed transfer)."""
    config = PipelineConfig(anomaly="densehybrid", failure="max_softmax", device=device, half=half)
    pipe = Pipeline.from_models_dir(DEMO_MODELS, config)
    options = RenderOptions(
        labels=True,
        color=True,
        overlay=True,
        maps=frozenset({"anomaly", "failure"}),
        threshold=threshold,
        alarm=(0,),
        open_set=threshold,
        anomaly_net=True,
    )
    return [pipe.process_frame(f, {"anomaly", "failure"}, options) for f in frames]


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16-autocast"])
def test_node_outputs_on_cuda_match_the_cpu(frames, half):
    probe = _node_outputs("cpu", False, frames[:1], 0.0)[0].anomaly_net
    threshold = float(np.quantile(probe, 0.9))  # a tenth of the pixels flagged
    cpu = _node_outputs("cpu", False, frames, threshold)
    gpu = _node_outputs("cuda", half, frames, threshold)
    agree, rank, flips = (0.999, 0.999, 0.02) if not half else (0.99, 0.98, 0.05)
    for c, g in zip(cpu, gpu, strict=True):
        for key in ("labels", "color", "overlay", "anomaly", "failure", "open_set", "anomaly_net"):
            a, b = getattr(c, key), getattr(g, key)
            assert a.shape == b.shape and a.dtype == b.dtype, key
        assert (c.labels == g.labels).mean() >= agree
        np.testing.assert_array_equal(g.color, visualize.colorize_labels(g.labels))
        assert (c.open_set == g.open_set).mean() >= agree - flips
        for key in ("anomaly", "failure", "anomaly_net"):
            assert np.isfinite(getattr(g, key)).all(), key
            assert _rank_corr(getattr(c, key), getattr(g, key)) >= rank, key
        # The overlay blends flagged pixels by their score over the map's percentiles.
        step = np.abs(c.overlay.astype(int) - g.overlay.astype(int)).max(axis=2)
        assert (step <= 2).mean() >= 1.0 - flips
        area = c.alarm.area_pixels
        assert abs(g.alarm.area_pixels - area) <= flips * area
        assert abs(g.alarm.anomalous_pixels - c.alarm.anomalous_pixels) <= flips * area
        span = float(np.ptp(c.anomaly_net))
        assert abs(g.alarm.max_score - c.alarm.max_score) <= (1e-3 if not half else 2e-2) * span
        assert abs(g.alarm.mean_failure - c.alarm.mean_failure) <= (1e-3 if not half else 1e-2)
        assert g.nonfinite == c.nonfinite


def test_overlay_jpeg_encoded_on_cuda_is_the_overlay(frames):
    """jpeg_encoder on a GPU: nvJPEG through torchvision, the bytes copied with the rest."""
    import cv2

    from segmentation_safety import device_jpeg

    assert device_jpeg.problem(torch.device("cuda")) is None
    config = PipelineConfig(anomaly="densehybrid", device="cuda")
    pipe = Pipeline.from_models_dir(DEMO_MODELS, config)
    options = RenderOptions(labels=False, overlay=True, overlay_jpeg=90, threshold=0.0)
    for frame in frames:
        r = pipe.process_frame(frame, {"anomaly"}, options)
        decoded = cv2.imdecode(r.overlay_jpeg, cv2.IMREAD_COLOR)[..., ::-1]
        assert decoded.shape == r.overlay.shape
        error = np.abs(decoded.astype(int) - r.overlay.astype(int)).mean()
        assert error < 4, error  # a smooth street scene at quality 90


def test_outputs_come_back_from_cuda_in_page_locked_memory():
    from segmentation_safety.pipeline import to_host

    g = torch.Generator().manual_seed(0)
    tensors = {
        "labels": torch.randint(0, 19, (256, 512), dtype=torch.uint8, generator=g),
        "anomaly": torch.rand(128, 256, generator=g),
        "iou": torch.rand(19, generator=g),
    }
    on_gpu = {k: t.cuda() for k, t in tensors.items()}
    for pinned in (True, False):
        host = to_host(on_gpu, pinned=pinned)
        for k, t in tensors.items():
            np.testing.assert_array_equal(host[k], t.numpy())
            assert torch.from_numpy(host[k]).is_pinned() == pinned, k
    # The pinned block outlives the call for as long as an array views it.
    labels = to_host(on_gpu)["labels"]
    torch.cuda.synchronize()
    for _ in range(3):
        to_host({k: t * 0 for k, t in on_gpu.items()})
    np.testing.assert_array_equal(labels, tensors["labels"].numpy())


def test_jpeg_decoded_on_cuda_is_close_to_the_hosts_pixels(frames):
    import cv2

    from segmentation_safety import device_jpeg

    for frame in frames:
        data = cv2.imencode(".jpg", frame[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
        host = cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]
        got = device_jpeg.decode(data.tobytes(), torch.device("cuda"))
        assert got.is_cuda and got.shape == host.shape
        # nvJPEG's IDCT and upsampling may round differently from libjpeg-turbo's.
        diff = np.abs(got.cpu().numpy().astype(int) - host.astype(int))
        assert diff.mean() < 1.0 and np.quantile(diff, 0.999) <= 8, (diff.mean(), diff.max())


def test_jpeg_decoded_on_cuda_leaves_memory_that_queued_kernels_read_alone():
    """pytorch/vision #9606's case: blocks freed while kernels queued on the caller's
    stream still read them must not be written by the decoder (device_jpeg settles the
    device before and after torchvision's codec)."""
    import cv2

    from segmentation_safety import device_jpeg

    cuda = torch.device("cuda")
    picture = np.random.default_rng(0).integers(0, 256, (512, 1024, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", picture)[1].tobytes()
    big = torch.randn(4096, 4096, device=cuda)
    for _ in range(5):
        blocks = [torch.full((512 * 1024 * 3,), i, dtype=torch.uint8, device=cuda)
                  for i in range(1, 9)]  # fmt: skip
        torch.cuda.synchronize()
        for _ in range(20):
            big = big @ big / 4096  # long work queued first
        sums = [b.sum(dtype=torch.int64) for b in blocks]  # queued behind it
        del blocks  # freed while the sums are still queued
        device_jpeg.decode(data, cuda)
        torch.cuda.synchronize()
        assert [int(s) for s in sums] == [i * 512 * 1024 * 3 for i in range(1, 9)]


def test_labels_upsampled_on_cuda_equal_the_cpus():
    """The label map's blends are separate multiplies and adds, each correctly rounded on
    either device, so the labels match exactly: the CPU's per-cell path (4×) and its
    per-pixel one (2×, 3×) against the GPU's per-pixel one."""
    import torch.nn.functional as F

    from segmentation_safety.label_upsampling import upsample_argmax

    torch.manual_seed(0)
    smooth = F.interpolate(torch.randn(1, 19, 8, 8) * 5, size=(64, 128), mode="bilinear")
    for logits in (smooth, torch.round(smooth * 2) / 2):
        for size in ((256, 512), (128, 256), (200, 333)):
            cpu = upsample_argmax(logits, size)
            assert torch.equal(upsample_argmax(logits.cuda(), size).cpu(), cpu), size
