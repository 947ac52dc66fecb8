"""The label map at the frame's size: the argmax of the bilinearly upsampled logits,
without upsampling every class at every pixel.

Bilinear weights are non-negative, so where the four source pixels around an output
pixel (a *cell*'s corners) share their argmax, every blend of them has that argmax too:
only the output pixels of *mixed* cells, whose corners disagree (4-9% of the cells
on street scenes), are blended, with PyTorch's source coordinates and weights
(align_corners=False) and its generic kernel's order of operations.

The labels are those of ``F.interpolate(...).argmax(1)`` except where two classes come
within float rounding of each other (exact ties on a coarse grid of logits, logits a few
ulps apart): there the order of operations decides, and PyTorch's own CPU kernels
differ from each other (an AVX512 build computes the source coordinate with a fused
multiply-add; channels-last input of more than 3 channels blends the four corners in
another order), and a cell whose corners share their argmax keeps it although rounding
could tie the blends. An infinite logit of a class that loses at all four corners of a
cell is not blended (PyTorch turns infinity × a zero weight into NaN, which argmax picks).

A mixed cell is blended in one of three ways:
- per cell (on the CPU, at large upsampling factors): its corners are read once for all
  the output pixels it covers, and only for the few classes that can win there;
- per column (the rest, where cells cover two or more output columns): each output
  column of a cell blends its two corner pairs across once, every class, and each pixel
  of the column then blends those two rows down. The same operations per pixel as the
  next, so the same values; fewer gathers where a column has several pixels;
- per pixel (the rest): the four corners of every output pixel, every class.
On a GPU these gathers are a few cheap kernels, where the per-cell path would add
several dozen small ones and three host synchronisations; not measured there yet, so a
GPU keeps the per-column and per-pixel paths.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from segmentation_safety.models.segmenter import resize_map

#: Mixed cells with at most this many classes that can win are blended per cell; the
#: rest per pixel. 2-3 classes can win in 89% of the mixed cells (the demo models on the
#: world's frames) to 95% (ESPNetv2 on real street frames), 4 or fewer in 96-99%; a
#: limit of 4-6 measured the same, 2 slower.
FEW_CLASSES = 4
#: Cells are blended per cell where they cover at least this many output pixels
#: (4× upsampling): at 2× the per-pixel blend was faster (ESPNetv2's 256×512 logits to
#: 512×1024, 1.5-1.9 against 2.3-2.7 ms).
CELL_PIXELS = 16
#: Mixed cells are blended per column where the cells cover at least this many output
#: columns on average; below, a column has about one pixel and nothing to share.
#: ESPNetv2's 256×512 logits of 5 real frames to 512×1024: 1.6-2.1 against 1.9-2.4 ms.
COLUMN_CELLS = 2


#: Mixed cells as (batch, row, column) of their top-left corner, one tensor each.
_Cells = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class _Axis(NamedTuple):
    """One axis of a bilinear resize, as PyTorch computes it (align_corners=False)."""

    lower: torch.Tensor  # per output pixel: lower source index
    upper: torch.Tensor  # per output pixel: upper source index
    weight: torch.Tensor  # per output pixel: the upper index's weight (float32)
    count: torch.Tensor  # per source pixel: output pixels with it as their lower index
    first: torch.Tensor  # per source pixel: the first of them
    most: int  # the largest count but at the two ends (where clamping adds pixels)


def upsample_argmax(
    logits: torch.Tensor,
    size: Sequence[int],
    argmax: torch.Tensor | None = None,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """argmax over classes of the logits bilinearly upsampled to ``size`` (B×K×h×w ->
    B×H×W uint8): ``F.interpolate``'s but at near-ties (see the module's docstring).

    ``argmax``: the logits' own B×h×w argmax when already known
    (``SegmenterOutput.argmax``). ``into``: a contiguous B×H×W uint8 tensor to write the
    labels to (K ≤ 255), returned. Upsampling all 19 classes to 1024×2048 and reading
    them back was once the node's most expensive step.
    """
    b_, k, h, w = logits.shape
    height, width = int(size[0]), int(size[1])
    if k > 255:
        return resize_map(logits, size).argmax(1)
    low = (logits.argmax(1) if argmax is None else argmax).to(torch.uint8)
    down = torch.cat([low[:, 1:], low[:, -1:]], 1)
    right = torch.cat([low[:, :, 1:], low[:, :, -1:]], 2)
    diag = torch.cat([down[:, :, 1:], down[:, :, -1:]], 2)
    mixed_cell = (low != down) | (low != right) | (low != diag)
    ys = _source_axis(height, h, logits.device)
    xs = _source_axis(width, w, logits.device)
    # Columns first, on h rows; then whole rows, which index_select copies as blocks.
    # gather for the columns: index_select along a uint8 tensor's last dimension took
    # 2.3 ms to 2048 columns on the CPU, gather 0.2.
    wide = torch.gather(low, 2, xs.lower.expand(b_, h, width))
    if into is None:
        out = wide.index_select(1, ys.lower)
    else:
        out = torch.index_select(wide, 1, ys.lower, out=into)
    cells = mixed_cell.nonzero(as_tuple=True)
    if cells[0].numel() == 0:
        return out
    # Both blends gather each pixel's K logits as a row, which channels-last memory keeps
    # together (ESPNetv2's slice of its 20 channels too). Channels-first logits (a network
    # run on channels-first weights) had every gather read K values a whole plane apart:
    # the labels took 2-5× as long as they do after this copy, the copy included.
    if k > 1 and logits.stride(1) != 1:
        logits = logits.contiguous(memory_format=torch.channels_last)
    flat = logits.permute(0, 2, 3, 1).reshape(b_ * h * w, k)
    if logits.device.type == "cpu":
        if ys.most * xs.most >= CELL_PIXELS:
            cells = _blend_cells(out, flat, cells, ys, xs)
        elif width >= COLUMN_CELLS * w:
            cells = _blend_columns(out, flat, cells, ys, xs)
    _blend_pixels(out, flat, cells, ys, xs)
    return out


def _blend_cells(
    out: torch.Tensor,
    flat: torch.Tensor,
    cells: _Cells,
    ys: _Axis,
    xs: _Axis,
) -> _Cells:
    """Labels the mixed ``cells`` (batch, row, column of their top-left corner) that have
    few classes that can win and the common size; returns the others."""
    bi, ii, ji = cells
    h, w, k = len(ys.count), len(xs.count), flat.shape[1]
    top = bi * (h * w) + ii * w
    bottom = bi * (h * w) + (ii + 1).clamp_(max=h - 1) * w
    right = (ji + 1).clamp_(max=w - 1)
    corners = flat.index_select(0, torch.cat([top + ji, top + right, bottom + ji, bottom + right]))
    corners = corners.view(4, -1, k)
    lowest, highest = corners.amin(0), corners.amax(0)
    least, most = torch.stack([lowest.amin(), highest.amax()]).tolist()
    if not (math.isfinite(least) and math.isfinite(most)):
        return cells  # an infinite weight-0 corner blends to NaN: per pixel, as PyTorch
    # A blend lies between its corners, so a class whose largest corner is below another
    # class's smallest never wins. Rounding moves each computed blend by at most about
    # 10 units of roundoff of the largest |logit| (products and sums, two levels), or of
    # the smallest subnormal where the values are that small: the margin, well above
    # twice either, keeps the per-cell labels those of the per-pixel blend.
    info = torch.finfo(flat.dtype)
    margin = 32 * info.eps * max(-least, most) + 32 * info.tiny * info.eps
    can_win = highest >= lowest.amax(1, keepdim=True) - margin
    n_rows, n_cols = ys.count.index_select(0, ii), xs.count.index_select(0, ji)
    few = min(FEW_CLASSES, k)
    here = (can_win.sum(1) <= few) & (n_rows <= ys.most) & (n_cols <= xs.most)
    here &= (n_rows > 0) & (n_cols > 0)  # a cell a downscale skips has nothing to label
    chosen = here.nonzero().squeeze(1)
    if chosen.numel():
        # Each cell's classes in class order (the largest rank first), padded with its
        # first: argmax gives a tie to the lower class, and a copy never beats its
        # original, so padding never wins under another class's name.
        rank = can_win.index_select(0, chosen) * torch.arange(k, 0, -1, device=flat.device)
        ranks, classes = rank.topk(few, dim=1)
        classes = torch.where(ranks > 0, classes, classes[:, :1])
        values = corners.index_select(1, chosen).gather(2, classes.expand(4, -1, -1))
        picked = tuple(t.index_select(0, chosen) for t in cells)
        _label_cells(out, values, classes, picked, ys, xs)
    rest = (~here).nonzero().squeeze(1)
    return tuple(t.index_select(0, rest) for t in cells)


def _label_cells(
    out: torch.Tensor,
    values: torch.Tensor,
    classes: torch.Tensor,
    cells: _Cells,
    ys: _Axis,
    xs: _Axis,
) -> None:
    """Blends each cell's 4×n×few corner ``values`` over the output pixels it covers and
    writes the winning ``classes`` (n×few) to ``out``."""
    bi, ii, ji = cells
    n, few = classes.shape
    height, width = len(ys.lower), len(xs.lower)
    dev = values.device
    # Every cell padded to the common size: rows (columns) past a cell's last repeat it,
    # so a padded pixel is one of the cell's, written twice with the same label.
    last_row = (ys.count.index_select(0, ii) - 1).unsqueeze(1)
    last_col = (xs.count.index_select(0, ji) - 1).unsqueeze(1)
    rows = torch.minimum(torch.arange(ys.most, device=dev), last_row)
    cols = torch.minimum(torch.arange(xs.most, device=dev), last_col)
    yy = ys.first.index_select(0, ii).unsqueeze(1) + rows  # n×rows
    xx = xs.first.index_select(0, ji).unsqueeze(1) + cols  # n×cols
    wy = ys.weight.index_select(0, yy.view(-1)).view(n, ys.most, 1, 1)
    wx = xs.weight.index_select(0, xx.view(-1)).view(n, xs.most, 1)
    # The per-pixel blend (PyTorch's generic kernel), one rounding per operation as there:
    # (1 - wy) * ((1 - wx) * a + wx * b) + wy * ((1 - wx) * c + wx * d), the columns once
    # per cell, then the rows.
    a, b, c, d = (v.unsqueeze(1) for v in values)  # n×1×few each
    upper = (a * (1 - wx)).add_(b * wx)  # n×cols×few
    lower = (c * (1 - wx)).add_(d * wx)
    blend = (upper.unsqueeze(1) * (1 - wy)).add_(lower.unsqueeze(1) * wy)  # n×rows×cols×few
    # argmax over a few classes as a running comparison: torch's argmax over a short
    # last dimension costs about as much as over all 19. Strictly greater: the first of
    # equal values (the lower class) stays, as in argmax.
    names = classes.to(torch.uint8).view(n, 1, 1, few)
    best, labels = blend[..., 0], names[..., 0].expand(n, ys.most, xs.most)
    for s in range(1, few):
        wins = blend[..., s] > best
        if s + 1 < few:
            best = torch.maximum(best, blend[..., s])
        labels = torch.where(wins, names[..., s], labels)
    index = (bi * (height * width)).view(-1, 1, 1) + yy.unsqueeze(2) * width + xx.unsqueeze(1)
    out.view(-1).index_copy_(0, index.view(-1), labels.reshape(-1))


def _blend_pixels(
    out: torch.Tensor,
    flat: torch.Tensor,
    cells: _Cells,
    ys: _Axis,
    xs: _Axis,
) -> None:
    """Labels the output pixels of the mixed ``cells``, blending every class per pixel."""
    bi, ii, ji = cells
    h, w = len(ys.count), len(xs.count)
    height, width = len(ys.lower), len(xs.lower)
    dev = flat.device
    # Each mixed cell stands for the rows × cols output pixels whose source corner it is:
    # listed per cell, then expanded.
    # (index_select, not tensor[index]: several times faster on the CPU.)
    n_rows, n_cols = ys.count.index_select(0, ii), xs.count.index_select(0, ji)
    reps = n_rows * n_cols
    n = int(reps.sum())
    if n == 0:
        return
    entry = torch.repeat_interleave(torch.arange(bi.numel(), device=dev), reps, output_size=n)
    offset = torch.arange(n, device=dev) - (torch.cumsum(reps, 0) - reps).index_select(0, entry)
    span = n_cols.index_select(0, entry)
    yy = ys.first.index_select(0, ii).index_select(0, entry)
    yy += torch.div(offset, span, rounding_mode="floor")
    xx = xs.first.index_select(0, ji).index_select(0, entry)
    xx += torch.remainder(offset, span)
    bb = bi.index_select(0, entry)
    base = bb * (h * w)
    r0 = base + ys.lower.index_select(0, yy) * w
    r1 = base + ys.upper.index_select(0, yy) * w
    wy = ys.weight.index_select(0, yy).unsqueeze(1)
    top, bot = _across(flat, r0, r1, xx, xs)
    winners = _winners(top.mul_(1 - wy).add_(bot.mul_(wy)))
    out.view(-1).index_copy_(0, bb * (height * width) + yy * width + xx, winners)


def _across(
    flat: torch.Tensor, r0: torch.Tensor, r1: torch.Tensor, xx: torch.Tensor, xs: _Axis
) -> tuple[torch.Tensor, torch.Tensor]:
    """The horizontal blends at output columns ``xx`` of the source rows starting at flat
    indices ``r0`` (top) and ``r1`` (bottom), every class: PyTorch's (1 - wx) * a + wx * b,
    in place on the fresh gathers (no new N×K buffer per operation)."""
    c0, c1 = xs.lower.index_select(0, xx), xs.upper.index_select(0, xx)
    wx = xs.weight.index_select(0, xx).unsqueeze(1)
    top = flat.index_select(0, r0 + c0).mul_(1 - wx)
    top += flat.index_select(0, r0 + c1).mul_(wx)
    bot = flat.index_select(0, r1 + c0).mul_(1 - wx)
    bot += flat.index_select(0, r1 + c1).mul_(wx)
    return top, bot


def _blend_columns(
    out: torch.Tensor,
    flat: torch.Tensor,
    cells: _Cells,
    ys: _Axis,
    xs: _Axis,
) -> _Cells:
    """Labels the output pixels of the mixed ``cells`` of the common height as
    :func:`_blend_pixels` does, with each output column's top and bottom blends computed
    once for its pixels; returns the other cells."""
    bi, ii, ji = cells
    n_rows = ys.count.index_select(0, ii)
    here = (n_rows <= ys.most) & (n_rows > 0)  # a cell a downscale skips: nothing to label
    if not bool(here.all()):
        chosen, rest = here.nonzero().squeeze(1), (~here).nonzero().squeeze(1)
        left = tuple(t.index_select(0, rest) for t in cells)
        bi, ii, ji = (t.index_select(0, chosen) for t in cells)
        n_rows = n_rows.index_select(0, chosen)
    else:
        left = tuple(t[:0] for t in cells)
    h, w = len(ys.count), len(xs.count)
    height, width = len(ys.lower), len(xs.lower)
    dev = flat.device
    n_cols = xs.count.index_select(0, ji)
    n_columns = int(n_cols.sum())
    if n_columns == 0:
        return left
    # The cells' output columns, listed per cell: a column's corners are its cell's rows
    # (every pixel of a cell has the cell's row as its lower source row) and its own
    # source columns.
    column_cell = torch.repeat_interleave(
        torch.arange(bi.numel(), device=dev), n_cols, output_size=n_columns
    )
    xx = xs.first.index_select(0, ji).index_select(0, column_cell)
    xx += torch.arange(n_columns, device=dev)
    xx -= (torch.cumsum(n_cols, 0) - n_cols).index_select(0, column_cell)
    base = bi * (h * w)
    r0 = (base + ii * w).index_select(0, column_cell)
    r1 = (base + (ii + 1).clamp_(max=h - 1) * w).index_select(0, column_cell)
    top, bot = _across(flat, r0, r1, xx, xs)
    # Then each column's pixels down, its rows padded to the common height: rows past a
    # cell's last repeat it, so a padded pixel is written twice with the same label.
    last_row = (n_rows - 1).index_select(0, column_cell)
    first_row = ys.first.index_select(0, ii).index_select(0, column_cell)
    column = bi.index_select(0, column_cell) * (height * width) + xx
    for row in range(ys.most):
        yy = first_row + last_row.clamp(max=row)
        wy = ys.weight.index_select(0, yy).unsqueeze(1)
        blend = (top * (1 - wy)).add_(bot * wy)
        out.view(-1).index_copy_(0, column + yy * width, _winners(blend))
    return left


def _winners(blend: torch.Tensor) -> torch.Tensor:
    """N×K blends -> each row's argmax, uint8. On the CPU through ``max``: its indices
    follow argmax's rules (the first of equal values, a NaN wins) and cost less, 0.20
    against 0.27 ms for 13.5k rows of 19 classes."""
    if blend.device.type == "cpu":
        return blend.max(1).indices.to(torch.uint8)
    return blend.argmax(1).to(torch.uint8)


@functools.lru_cache(maxsize=32)
def _source_axis(n_out: int, n_in: int, device: torch.device) -> _Axis:
    """One axis of a resize from ``n_in`` to ``n_out`` pixels, in float32 as PyTorch's
    bilinear (align_corners=False) computes it. Cached: a node asks for the same few
    sizes every frame. Callers must not modify it.
    """
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    dst = torch.arange(n_out, dtype=torch.float32, device=device)
    real = (scale.to(device) * (dst + 0.5) - 0.5).clamp_(min=0.0)
    i0 = real.long()
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    count = torch.bincount(i0, minlength=n_in)
    most = int((count[1:-1] if n_in > 2 else count).max())
    return _Axis(i0, i1, real - i0.float(), count, torch.cumsum(count, 0) - count, most)
