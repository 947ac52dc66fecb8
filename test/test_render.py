"""Device-side post-processing agrees with the host reference it replaces."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segmentation_safety import render, visualize
from segmentation_safety.label_upsampling import upsample_argmax
from segmentation_safety.metrics.segmentation import fuse_open_set
from segmentation_safety.pipeline import Pipeline, PipelineConfig, to_host
from segmentation_safety.types import RenderOptions


def test_upsample_argmax_is_the_argmax_of_the_bilinear_upsample():
    torch.manual_seed(0)
    cases = [
        ((1, 19, 32, 64), (128, 256)),
        ((2, 5, 13, 17), (50, 70)),
        ((1, 19, 30, 41), (97, 203)),
        ((1, 3, 8, 8), (8, 8)),
        ((1, 4, 9, 9), (5, 5)),
    ]
    for shape, size in cases:
        # Smooth logits (regions, as a network gives) and pure noise (boundaries everywhere).
        smooth = F.interpolate(torch.randn(*shape[:2], 4, 4) * 5, size=shape[2:], mode="bilinear")
        for logits in (smooth, torch.randn(shape)):
            logits = logits.contiguous(memory_format=torch.channels_last)
            ref = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)
            got = upsample_argmax(logits, size)
            assert got.dtype == torch.uint8 and got.shape == ref.shape
            assert int((got.long() != ref).sum()) == 0, (shape, size)


def test_blends_are_won_by_argmaxs_classes_with_ties_nan_and_infinities():
    from segmentation_safety.label_upsampling import _winners

    torch.manual_seed(3)
    blend = torch.round(torch.randn(4000, 19) * 2) / 2  # many exact ties
    blend[::7, 4] = float("nan")
    blend[::11, 9] = float("nan")  # two NaN in a row: the first wins, as in argmax
    blend[::5, 2], blend[::13, 6] = float("inf"), float("-inf")
    blend[::17] = float("-inf")
    got = _winners(blend)
    assert got.dtype == torch.uint8
    assert torch.equal(got.long(), blend.argmax(1))


def test_channels_first_logits_are_blended_from_rows_with_the_same_labels(monkeypatch):
    # Each blend gathers a pixel's classes as one row: channels-first logits are laid out
    # channels-last first, or every gather reads values a plane apart.
    from segmentation_safety import label_upsampling

    rows = []
    for name in ("_blend_pixels", "_blend_columns", "_blend_cells"):
        real = getattr(label_upsampling, name)

        def spy(out, flat, *rest, real=real):
            rows.append(flat.stride(1) == 1 and flat.stride(0) == flat.shape[1])
            return real(out, flat, *rest)

        monkeypatch.setattr(label_upsampling, name, spy)
    torch.manual_seed(3)
    first = F.interpolate(torch.randn(1, 19, 4, 4) * 5, size=(32, 64), mode="bilinear")
    last = first.contiguous(memory_format=torch.channels_last)
    assert first.is_contiguous() and first.stride(1) != 1
    for size in ((48, 96), (64, 128), (128, 256)):  # per pixel; per column; per cell
        rows.clear()
        assert torch.equal(upsample_argmax(first, size), upsample_argmax(last, size))
        assert rows and all(rows)


def test_labels_blended_per_cell_or_column_are_those_of_the_per_pixel_blend(monkeypatch):
    # Where classes tie or come within rounding of each other the order of operations
    # decides, and PyTorch's own kernels differ there by CPU build and memory format: the
    # per-cell and per-column paths must give the per-pixel blend's labels, bit for bit.
    # Ties on a coarse grid (argmax keeps the lower class), subnormal logits (rounding
    # there is absolute), ±inf and NaN (the per-pixel blend takes those cells in the
    # per-cell path; the per-column one blends them alike), and huge logits.
    from segmentation_safety import label_upsampling

    def per_pixel(logits, size, columns=False):
        with monkeypatch.context() as patch:
            patch.setattr(label_upsampling, "CELL_PIXELS", 10**9)
            if not columns:
                patch.setattr(label_upsampling, "COLUMN_CELLS", 10**9)
            return upsample_argmax(logits, size)

    torch.manual_seed(1)
    smooth = F.interpolate(torch.randn(2, 7, 4, 4) * 5, size=(16, 24), mode="bilinear")
    tied = torch.round(smooth * 2) / 2
    subnormal = torch.round(smooth * 4) * 2.0**-149  # a few units of the smallest float32
    infinite, missing, huge = smooth.clone(), smooth.clone(), smooth * 1e30
    infinite[0, 2, 5, 5], infinite[1, 3, 7:9, 7] = float("inf"), float("-inf")
    missing[0, 1, 3, 3] = float("nan")
    for logits in (tied, subnormal, infinite, missing, huge):
        for size in ((64, 96), (90, 130), (197, 41), (32, 48), (41, 61), (10, 96)):
            logits = logits.contiguous(memory_format=torch.channels_last)
            want = per_pixel(logits, size)
            assert torch.equal(upsample_argmax(logits, size), want), size
            assert torch.equal(per_pixel(logits, size, columns=True), want), size
    # A class ruled out by less than one subnormal unit still ties where rounding is
    # absolute (class 0's corners 11, 15; class 1's 20, 16: both blend to 16 units).
    unit = 2.0**-149
    x = torch.zeros(1, 3, 24, 8)
    x[0, 0, 21:23, 1:3] = torch.tensor([11.0, 15.0]) * unit
    x[0, 1, 21:23, 1:3] = torch.tensor([20.0, 16.0]) * unit
    x[0, 2, 21:23, 1:3] = torch.tensor([25.0, 0.0]) * unit
    assert torch.equal(upsample_argmax(x, (294, 48)), per_pixel(x, (294, 48)))
    assert torch.equal(per_pixel(x, (48, 16), columns=True), per_pixel(x, (48, 16)))


def test_mixed_cells_are_labelled_per_cell_or_per_column_where_cells_cover_several_pixels(
    monkeypatch,
):
    # At 4× and more a cell's corners are read once for all its output pixels, at 2× each
    # output column's: only cells where many classes can win, or of an edge's larger
    # size, go pixel by pixel; below 2× every mixed cell does.
    from segmentation_safety import label_upsampling

    per_pixel = []
    blend_pixels = label_upsampling._blend_pixels

    def spy(out, flat, cells, ys, xs):
        per_pixel.append(cells[0].numel())
        return blend_pixels(out, flat, cells, ys, xs)

    monkeypatch.setattr(label_upsampling, "_blend_pixels", spy)
    torch.manual_seed(2)
    logits = F.interpolate(torch.randn(1, 19, 4, 4) * 5, size=(32, 64), mode="bilinear")
    low = logits.argmax(1)
    mixed = int(((low[:, :-1, :-1] != low[:, 1:, :-1]) | (low[:, :-1, :-1] != low[:, :-1, 1:])
                 | (low[:, :-1, :-1] != low[:, 1:, 1:])).sum())  # fmt: skip
    for size, grouped in (((128, 256), True), ((64, 128), True), ((48, 96), False)):
        per_pixel.clear()
        ref = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)
        assert torch.equal(upsample_argmax(logits, size).long(), ref)
        assert mixed > 0 and len(per_pixel) == 1
        if grouped:
            assert per_pixel[0] < mixed / 2
        else:
            assert per_pixel[0] >= mixed


def test_colours_and_overlay_match_the_host_drawings():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 20, (24, 40)).astype(np.uint8)
    labels[0, 0] = 255
    palette = render.palette_on(torch.device("cpu"))
    # uint8 ids on the CPU take OpenCV's lookup; other ids (and devices) the gather.
    for ids in (torch.from_numpy(labels), torch.from_numpy(labels).long()):
        want = visualize.colorize_labels(labels)
        np.testing.assert_array_equal(render.colorize(ids, palette).numpy(), want)
        # Into a caller's array (a message's pixels), on either path: written in place.
        into = torch.zeros((24, 40, 3), dtype=torch.uint8)
        assert render.colorize(ids, palette, into) is into
        np.testing.assert_array_equal(into.numpy(), want)
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    anomaly = rng.normal(0.5, 0.3, (24, 40)).astype(np.float32)
    anomaly[3, 4], anomaly[5, 6], anomaly[7, 8] = np.nan, np.inf, -np.inf
    span = visualize.map_range(anomaly)
    got = render.hazard_overlay(torch.from_numpy(rgb), torch.from_numpy(anomaly), 0.5, span)
    want = visualize.hazard_overlay(rgb, anomaly, threshold=0.5)
    assert int(np.abs(got.numpy().astype(int) - want.astype(int)).max()) <= 1
    assert (got.numpy() != rgb).any()  # something was painted
    np.testing.assert_allclose(render.map_range(torch.from_numpy(anomaly)), span, rtol=1e-5)


def test_open_set_labels_are_fuse_open_sets_on_the_host_and_into_an_array():
    rng = np.random.default_rng(4)
    labels = torch.from_numpy(rng.integers(0, 19, (30, 50), dtype=np.uint8))
    anomaly = torch.from_numpy(rng.normal(size=(30, 50)).astype(np.float32))
    anomaly[0, :5] = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.25, 0.2500001])
    for threshold in (0.25, -0.5, float("nan"), 1e9):
        want = fuse_open_set(labels, anomaly, threshold, 19).to(torch.uint8)
        got = render.open_set(labels, anomaly, threshold, 19)
        assert got.dtype == torch.uint8 and torch.equal(got, want), threshold
        into = torch.full((30, 50), 7, dtype=torch.uint8)
        assert render.open_set(labels, anomaly, threshold, 19, into) is into
        assert torch.equal(into, want)
    assert (render.open_set(labels, anomaly, 0.25, 19) == 19).any()
    # Labels as int64 (more than 255 classes) take torch's masked fill, the same rule.
    wide = labels.long()
    np.testing.assert_array_equal(render.open_set(wide, anomaly, 0.25, 19).numpy(),
                                  fuse_open_set(labels, anomaly, 0.25, 19).numpy())  # fmt: skip


def test_alarm_counts_nan_as_anomalous_and_ignores_other_classes():
    labels = torch.tensor([[0, 0, 0, 1], [0, 0, 2, 1]], dtype=torch.uint8)
    anomaly = torch.tensor([[0.9, float("nan"), 0.1, 5.0], [0.2, 0.3, 9.0, 9.0]])
    c = render.alarm_counts(labels, anomaly, anomaly, 0.5, (0,), region="drivable")
    assert (c.area_pixels, c.anomalous_pixels) == (5, 2) and c.max_score == np.float32(0.9)
    assert np.isclose(c.mean_failure, float(np.nanmean(anomaly.numpy())))


def test_to_host_returns_every_tensor_with_its_dtype_and_shape():
    tensors = {"a": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
               "b": torch.rand(3, 5), "c": torch.rand(4)[::2]}  # fmt: skip
    for pack in (False, True):  # True: the one-transfer path a GPU takes
        host = to_host(tensors, pack=pack)
        for k, t in tensors.items():
            np.testing.assert_array_equal(host[k], t.numpy())
            assert host[k].dtype == t.numpy().dtype and host[k].flags.aligned


def _pipeline() -> Pipeline:
    from segmentation_safety.detectors import registry
    from segmentation_safety.models.zoo import build_segmenter

    torch.manual_seed(0)
    seg = build_segmenter("tiny", num_classes=19, width=8)
    config = PipelineConfig(anomaly="max_softmax", failure="max_softmax", device="cpu")
    return Pipeline(seg, {"max_softmax": registry.build("max_softmax", seg)}, config)


def test_process_frame_gives_what_process_gives_and_scales_the_maps():
    pipe = _pipeline()
    image = np.random.default_rng(2).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    ref = pipe.process(image, {"anomaly", "failure"})
    every = RenderOptions(color=True, overlay=True, maps=frozenset({"anomaly", "failure"}),
                          alarm=(0, 1), threshold=0.3)  # fmt: skip
    r = pipe.process_frame(image, {"anomaly", "failure"}, every)
    np.testing.assert_array_equal(r.labels, ref.labels)
    np.testing.assert_array_equal(r.anomaly, ref.anomaly)
    np.testing.assert_array_equal(r.color, visualize.colorize_labels(ref.labels))
    assert r.overlay.shape == image.shape
    want = render.alarm_counts(
        torch.from_numpy(ref.labels), torch.from_numpy(ref.anomaly),
        torch.from_numpy(ref.failure), 0.3, (0, 1),
    )  # fmt: skip
    assert r.alarm == want
    half = pipe.process_frame(
        image, {"anomaly"}, RenderOptions(labels=False, maps=frozenset({"anomaly"}), map_scale=0.5)
    )
    assert half.anomaly.shape == (24, 40) and half.labels is None and half.color is None
    assert half.failure is None and half.overlay is None and half.alarm is None


def test_outputs_computed_into_given_arrays_are_the_same_pixels_there():
    # The node hands the pixels of the messages it will publish: every output computed
    # there is bit-identical to the frame computed without them, and lives in them.
    pipe = _pipeline()
    image = np.random.default_rng(7).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    for scale in (1.0, 0.5):
        every = RenderOptions(color=True, overlay=True, maps=frozenset({"anomaly", "failure"}),
                              alarm=(0, 1), threshold=0.3, map_scale=scale,
                              open_set=0.3)  # fmt: skip
        ref = pipe.process_frame(image, {"anomaly", "failure"}, every)
        small = (round(48 * scale), round(80 * scale))
        into = {"labels": np.empty((48, 80), np.uint8), "color": np.empty((48, 80, 3), np.uint8),
                "overlay": np.empty((48, 80, 3), np.uint8),
                "anomaly": np.empty(small, np.float32), "failure": np.empty(small, np.float32),
                "open_set": np.empty((48, 80), np.uint8), "nonsense": np.empty(3)}  # fmt: skip
        asked = []  # a function giving them is asked once, after the network

        def giving(arrays=into, asked=asked):
            asked.append(1)
            return arrays

        for given in (into, giving):
            got = pipe.process_frame(image, {"anomaly", "failure"}, every, into=given)
            for key in ("labels", "color", "overlay", "anomaly", "failure", "open_set"):
                np.testing.assert_array_equal(getattr(got, key), getattr(ref, key))
                assert np.shares_memory(getattr(got, key), into[key]), key
            assert got.alarm == ref.alarm
        assert asked == [1]
    # An array of another shape or type is left alone: the output comes back elsewhere.
    wrong = {"labels": np.empty((48, 81), np.uint8), "anomaly": np.empty((48, 80), np.float64)}
    got = pipe.process_frame(image, {"anomaly"}, every, into=wrong)
    assert not np.shares_memory(got.labels, wrong["labels"])


def test_overlay_paints_exactly_the_pixels_above_the_threshold_red():
    pipe = _pipeline()
    image = np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    anomaly = pipe.process(image, {"anomaly"}).anomaly  # the map at the frame's size
    threshold = float(np.median(anomaly))  # half the frame flagged
    options = RenderOptions(labels=False, overlay=True, threshold=threshold)
    r = pipe.process_frame(image, {"anomaly"}, options)
    flagged = anomaly > threshold
    assert 0.3 < flagged.mean() < 0.7
    # Quiet pixels are the camera's, untouched; flagged ones are blended towards red
    # with at least half the opacity (0.6 * 0.5), whatever their score.
    np.testing.assert_array_equal(r.overlay[~flagged], image[~flagged])
    before, after = image[flagged].astype(int), r.overlay[flagged].astype(int)
    paint = np.array([255, 0, 0])
    for weight in (0.3, 0.6):  # bounds of the blend weight, each channel within rounding
        bound = before + weight * (paint - before)
        if weight == 0.3:
            assert (np.abs(after - before) >= np.abs(bound - before) - 1).all()
        else:
            assert (np.abs(after - before) <= np.abs(bound - before) + 1).all()
    assert (after[:, 0] >= before[:, 0]).all() and (after[:, 1:] <= before[:, 1:]).all()


def test_overlay_jpeg_is_the_overlay_encoded_where_it_was_drawn():
    import cv2

    pipe = _pipeline()
    # A smooth picture (what jpeg keeps well) with half its pixels painted by the overlay.
    yy, xx = np.mgrid[0:64, 0:96]
    image = np.stack([xx * 2, yy * 3, 255 - xx * 2], axis=2).astype(np.uint8)
    anomaly = pipe.process(image, {"anomaly"}).anomaly
    threshold = float(np.median(anomaly))
    both = RenderOptions(labels=False, overlay=True, overlay_jpeg=95, threshold=threshold)
    r = pipe.process_frame(image, {"anomaly"}, both)
    assert r.overlay_jpeg.dtype == np.uint8 and r.overlay_jpeg.ndim == 1
    decoded = cv2.cvtColor(cv2.imdecode(r.overlay_jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert decoded.shape == image.shape
    flagged = anomaly > threshold
    error = np.abs(decoded.astype(int) - r.overlay.astype(int))[flagged].mean()
    painted = np.abs(image.astype(int) - r.overlay.astype(int))[flagged].mean()
    assert error < 6 < painted, (error, painted)  # the overlay's colours, not the camera's
    # Only the bytes when the raw overlay is not asked for; the quality is the option's.
    small = pipe.process_frame(
        image, {"anomaly"}, RenderOptions(labels=False, overlay_jpeg=20, threshold=threshold)
    )
    assert small.overlay is None and 0 < small.overlay_jpeg.size < r.overlay_jpeg.size
    none = pipe.process_frame(image, {"anomaly"}, RenderOptions(labels=False, overlay=True))
    assert none.overlay_jpeg is None and none.overlay_jpeg_error is None


def test_an_overlay_the_device_cannot_encode_comes_back_as_the_picture_with_why(monkeypatch):
    from segmentation_safety import device_jpeg

    def out_of_memory(rgb, quality):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(device_jpeg, "encode", out_of_memory)
    pipe = _pipeline()
    image = np.full((32, 48, 3), 90, dtype=np.uint8)
    r = pipe.process_frame(image, {"anomaly"}, RenderOptions(labels=False, overlay_jpeg=80))
    assert r.overlay_jpeg is None and r.overlay is not None and r.overlay.shape == image.shape
    assert r.overlay_jpeg_error == "RuntimeError: out of memory"


def test_input_halved_by_the_uint8_kernel_has_the_pixels_of_the_float_passes():
    from segmentation_safety.pipeline import resize_input

    g = torch.Generator().manual_seed(3)
    sizes = (((64, 128), (32, 64)), ((96, 122), (48, 61)), ((64, 64), (32, 64)),
             ((40, 60), (40, 60)), ((512, 1024), (256, 512)))  # fmt: skip
    for ((h, w), (out_h, out_w)), _ in itertools.product(sizes, range(3)):
        frame = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8, generator=g)
        x = frame.permute(0, 3, 1, 2)  # as Pipeline.to_input lays frames out
        fast = resize_input(x, (out_h, out_w))
        reference = resize_input(x.float(), (out_h, out_w))  # float input: the float passes
        # uint8 where the kernel resized, float where the frame kept its size.
        assert fast.dtype == (torch.float32 if (h, w) == (out_h, out_w) else torch.uint8)
        torch.testing.assert_close(fast.float(), reference, rtol=0, atol=0)


def test_fast_input_resize_is_the_uint8_kernel_a_level_or_two_from_pil():
    from segmentation_safety.pipeline import resize_input

    g = torch.Generator().manual_seed(5)
    smooth = F.interpolate(torch.rand(1, 3, 9, 16, generator=g) * 255, size=(90, 160),
                           mode="bicubic", align_corners=False)  # fmt: skip
    x = smooth.clamp(0, 255).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # as Pipeline.to_input
    size = (64, 128)  # 1.40625 and 1.25: where the two round differently
    fast, pil = resize_input(x, size, "fast"), resize_input(x, size)
    kernel = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(fast, kernel, rtol=0, atol=0)
    fast = fast.float()
    assert 0 < (fast != pil).float().mean() < 0.05 and (fast - pil).abs().max() <= 2
    # Halving is exact either way; float input and the frame's own size have nothing to win.
    torch.testing.assert_close(resize_input(x, (45, 80), "fast"), resize_input(x, (45, 80)))
    torch.testing.assert_close(resize_input(x.float(), size, "fast"), pil)
    torch.testing.assert_close(resize_input(x, (90, 160), "fast"), x.float())
    with pytest.raises(ValueError, match="pil, fast"):
        resize_input(x, size, "nearest")


def test_the_pipeline_feeds_its_network_the_configured_resize():
    from segmentation_safety.models.zoo import build_segmenter
    from segmentation_safety.pipeline import resize_input

    torch.manual_seed(0)
    seg = build_segmenter("tiny", num_classes=19, width=8).eval()
    frame = torch.randint(0, 256, (37, 61, 3), dtype=torch.uint8)
    logits = {}
    for method in ("pil", "fast"):
        config = PipelineConfig(
            anomaly=None, device="cpu", input_size=(24, 40), input_resize=method
        )
        pipe = Pipeline(seg, {}, config)
        x = pipe.to_input(frame.numpy())
        logits[method] = pipe.run(x, [])[0].logits
        with torch.inference_mode():
            want = seg(seg.normalize(resize_input(x, (24, 40), method)), []).logits
        torch.testing.assert_close(logits[method], want, rtol=0, atol=0)
    assert not torch.equal(logits["pil"], logits["fast"])
    with pytest.raises(ValueError, match="input_resize must be one of pil, fast"):
        Pipeline(seg, {}, PipelineConfig(anomaly=None, device="cpu", input_resize="area"))


def test_the_cli_offers_the_pipelines_resize_methods():
    import argparse

    from segmentation_safety.commands.common import add_input_resize_arg
    from segmentation_safety.pipeline import INPUT_RESIZES

    parser = argparse.ArgumentParser()
    add_input_resize_arg(parser)
    (action,) = [a for a in parser._actions if a.dest == "input_resize"]
    assert tuple(action.choices) == INPUT_RESIZES and action.default == "pil"


def test_process_frame_counts_non_finite_scores_even_for_maps_it_does_not_return():
    from segmentation_safety.types import DetectorOutput

    pipe = _pipeline()
    detector = pipe.detectors["max_softmax"]
    plain = detector.forward

    def with_nans(seg):  # noqa: ANN001, ANN202
        out = plain(seg)
        anomaly = out.anomaly.clone()
        anomaly[:, :2, :3] = float("nan")
        anomaly[:, 5, 5] = float("-inf")
        # Finite, but their sum overflows: none of them counts.
        failure = torch.full_like(out.failure, 3e38)
        return DetectorOutput(anomaly=anomaly, failure=failure)

    detector.forward = with_nans
    image = np.zeros((32, 48, 3), np.uint8)
    r = pipe.process_frame(image, {"anomaly", "failure"}, RenderOptions(labels=False))
    assert r.anomaly is None and r.nonfinite == {"anomaly": 7, "failure": 0}


def _reference_region(labels: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """The corridor from the hull of every drivable pixel (no shortcut)."""
    import cv2

    drivable = np.isin(labels, classes)
    points = cv2.findNonZero(drivable.astype(np.uint8))
    if points is None:
        return drivable
    hull = np.zeros(labels.shape, np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
    return hull.astype(bool) | drivable


def test_corridor_equals_the_hull_of_every_drivable_pixel():
    from segmentation_safety.drivable import drivable_region

    rng = np.random.default_rng(3)
    for trial in range(60):
        h, w = rng.integers(5, 70, 2)
        labels = rng.integers(0, 4, (h, w)).astype(np.uint8)
        labels[rng.random((h, w)) < rng.random()] = 3  # from sparse to dense road
        if trial % 10 == 0:
            labels[:] = 2  # no road at all
        got = drivable_region(torch.from_numpy(labels), (0, 1)).numpy()
        np.testing.assert_array_equal(got, _reference_region(labels, (0, 1)))


def test_corridor_keeps_the_far_end_of_a_narrowing_road():
    from segmentation_safety.drivable import drivable_region

    # A road narrowing to a 1-pixel tip at row 2 (the horizon), off every 4th row and
    # column: an object there sits inside the corridor, not outside it.
    labels = np.full((24, 40), 2, np.uint8)
    for y in range(2, 24):
        half = (y - 2) // 2
        labels[y, 21 - half : 22 + half] = 0
    area = drivable_region(torch.from_numpy(labels), (0,)).numpy()
    assert area[2, 21] and area[3, 21] and area.sum() == _reference_region(labels, (0,)).sum()


def test_alarm_counts_match_a_plain_count_over_the_corridor():
    from segmentation_safety.drivable import drivable_region

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, (40, 64)).astype(np.uint8)
    anomaly = rng.normal(0.0, 1.0, (40, 64)).astype(np.float32)
    anomaly[1, 2], anomaly[3, 4], anomaly[5, 6] = np.nan, np.inf, -np.inf
    failure = rng.random((40, 64)).astype(np.float32)
    area = drivable_region(torch.from_numpy(labels), (0,)).numpy()
    finite = np.where(np.isfinite(anomaly), anomaly, np.float32(0.25))
    for threshold, scores_map in itertools.product((-0.5, 0.7, float("nan")), (anomaly, finite)):
        for listed in (None, render.flat_above(torch.from_numpy(scores_map), threshold)):
            c = render.alarm_counts(
                torch.from_numpy(labels), torch.from_numpy(scores_map),
                torch.from_numpy(failure), threshold, (0,), above=listed,
            )  # fmt: skip
            scores = scores_map[area]
            quiet = scores <= threshold  # NaN scores (and a NaN threshold) are anomalous
            assert c.area_pixels == int(area.sum())
            assert c.anomalous_pixels == int((~quiet).sum())
            assert c.max_score == scores[np.isfinite(scores)].max()
            assert np.isclose(c.mean_failure, failure.mean())
    failure[0, 0] = np.nan  # the mean leaves NaN out
    c = render.alarm_counts(torch.from_numpy(labels), None, torch.from_numpy(failure), 0.0, (0,))
    assert np.isclose(c.mean_failure, np.nanmean(failure)) and np.isnan(c.max_score)


def test_host_and_device_tests_agree_on_every_pixel(monkeypatch):
    # On the host the per-pixel tests run in numpy (on_host); elsewhere in torch. Both
    # paths on the same CPU tensors, with NaN, infinities, a threshold between two
    # float32 values and thresholds beyond float32's range.
    from segmentation_safety import drivable

    rng = np.random.default_rng(6)
    labels = torch.from_numpy(rng.integers(0, 4, (37, 53)).astype(np.uint8))
    anomaly = rng.normal(0.0, 1.0, (37, 53)).astype(np.float32)
    anomaly[rng.random((37, 53)) < 0.05] = np.float32(0.1)
    for value in (np.nan, np.inf, -np.inf):
        anomaly[rng.random((37, 53)) < 0.02] = value
    anomaly = torch.from_numpy(anomaly)
    rgb = torch.from_numpy(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    thresholds = (0.1, -0.5, 1e300, -1e300, float("inf"), float("-inf"), float("nan"))

    def everything():
        out = [drivable.drivable_mask(labels, (0, 2)), drivable.drivable_region(labels, (1,))]
        for t in thresholds:
            out.append(render.hazard_overlay(rgb, anomaly, t, (-1.0, 1.0)))
            listed = render.flat_above(anomaly, t)
            for region in drivable.REGIONS:
                out.append(render.alarm_counts(labels, anomaly, None, t, (0, 3), region))
                out.append(render.alarm_counts(labels, anomaly, None, t, (0, 3), region,
                                               above=listed))  # fmt: skip
            finite = anomaly.nan_to_num(nan=0.3, posinf=7.0, neginf=-7.0)  # the usual map
            out.append(render.alarm_counts(labels, finite, None, t, (0, 3),
                                           above=render.flat_above(finite, t)))  # fmt: skip
            out.append(render.alarm_counts(labels, finite, None, t, (0, 3)))
        return out

    host = everything()
    # A map that carries gradients (a caller outside the node) takes the same path.
    scored = anomaly.clone().requires_grad_(True)
    with_grad = render.alarm_counts(labels, scored, None, 0.1, (0, 3))
    plain = render.alarm_counts(labels, anomaly, None, 0.1, (0, 3))
    assert (with_grad.anomalous_pixels, with_grad.max_score) == (
        plain.anomalous_pixels,
        plain.max_score,
    )
    assert torch.equal(
        render.hazard_overlay(rgb, scored, 0.1, (-1.0, 1.0)),
        render.hazard_overlay(rgb, anomaly, 0.1, (-1.0, 1.0)),
    )
    for module in (render, drivable):
        monkeypatch.setattr(module, "on_host", lambda t: False)
    device = everything()
    for got, want in zip(host, device, strict=True):
        if isinstance(got, torch.Tensor):
            assert torch.equal(got, want)
        else:  # AlarmCounts: NaN maxima compare equal here
            assert got.area_pixels == want.area_pixels
            assert got.anomalous_pixels == want.anomalous_pixels
            np.testing.assert_equal(got.max_score, want.max_score)


def test_alarm_max_score_is_nan_when_the_area_has_no_finite_score():
    # Road on two rows, a building on the third; the map has no finite value on the road
    # (a NaN map, or infinities) and a finite one on the building, outside the area.
    labels = torch.zeros(3, 4, dtype=torch.uint8)
    labels[2] = 2
    for fill in (float("nan"), float("inf"), float("-inf")):
        anomaly = torch.full((3, 4), fill)
        anomaly[2] = 7.0
        c = render.alarm_counts(labels, anomaly, None, 0.5, (0,), region="drivable")
        assert c.area_pixels == 8 and np.isnan(c.max_score), (fill, c)
        assert c.anomalous_pixels == (0 if fill == float("-inf") else 8)
    # One finite score among them is the maximum, however low.
    anomaly[1, 2] = -1e30
    c = render.alarm_counts(labels, anomaly, None, 0.5, (0,), region="drivable")
    assert c.max_score == np.float32(-1e30)


def test_overlay_range_equals_numpy_percentiles_on_any_size():
    rng = np.random.default_rng(5)
    for n in (1, 2, 3, 7, 100, 4099):
        values = rng.normal(size=n).astype(np.float32)
        if n > 3:
            values[:3] = (np.nan, np.inf, -np.inf)
        want = visualize.map_range(values)
        np.testing.assert_allclose(render.map_range(torch.from_numpy(values)), want, rtol=1e-6)
    assert render.map_range(torch.tensor([float("nan")])) == (0.0, 1.0)


def test_one_max_serves_the_detectors_and_the_labels():
    from segmentation_safety.types import SegmenterOutput

    torch.manual_seed(2)
    logits = torch.randn(1, 19, 24, 40).round().contiguous(memory_format=torch.channels_last)
    seg = SegmenterOutput(logits=logits, features=logits)
    assert torch.equal(seg.argmax(), logits.argmax(1))
    values, classes = seg.class_max()
    assert torch.equal(values, logits.amax(1)) and torch.equal(classes, logits.argmax(1))
    assert seg.argmax() is classes and seg.class_max()[0] is values  # computed once
    ref = upsample_argmax(logits, (97, 150))
    assert torch.equal(upsample_argmax(logits, (97, 150), seg.argmax()), ref)


VOC_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
             "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
             "pottedplant", "sheep", "sofa", "train", "tvmonitor"]  # fmt: skip


def test_a_segmenter_of_other_classes_is_drawn_in_colours_of_its_own():
    from segmentation_safety.labels import TRAIN_NAMES
    from segmentation_safety.models.tiny import TinySegmenter

    assert visualize.palette_for(TRAIN_NAMES) is visualize.palette_for(None) is visualize.PALETTE
    assert visualize.palette_for(TRAIN_NAMES[:7]) is visualize.PALETTE  # a Cityscapes subset
    voc = visualize.palette_for(VOC_NAMES)
    # Pascal VOC's published colours: person (15) and tvmonitor (20); every id its own colour
    # (Cityscapes' palette has none past 18), unlabeled black.
    assert voc[15].tolist() == [192, 128, 128] and voc[20].tolist() == [0, 64, 128]
    assert len({tuple(c) for c in voc[:255]}) == 255 and voc[255].tolist() == [0, 0, 0]
    # The pipeline colours a VOC segmenter's labels with it.
    torch.manual_seed(0)
    seg = TinySegmenter(num_classes=21, width=4)
    config = PipelineConfig(device="cpu", anomaly=None, failure=None, class_iou=None)
    pipe = Pipeline(seg, {}, config, class_names=VOC_NAMES)
    image = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    frame = pipe.process_frame(image, (), RenderOptions(color=True))
    np.testing.assert_array_equal(frame.color, voc[frame.labels])
