"""Real-NVP density over per-pixel embedding vectors (Fishyscapes §4.2, appendix B.6).

The flow works on flattened pixel vectors: a B×C×h×w embedding map becomes (B·h·w)×C
rows, so every pixel is one sample and there is no Python loop over pixels. Inside, the
layers see the vectors channel-major (C×N): a channel slice or permutation is then a
block of contiguous rows and the coupling MLPs are plain matrix products, where the N×C
layout gathered columns (about 2× slower at 512×1024, same numbers). Each step
is, in the order of B.6, an affine coupling, a Real-NVP batch normalisation and a fixed
random permutation. Couplings start as the identity (last layer zero), as Glow
recommends, so an untrained flow is a standard normal up to batch-norm's epsilon.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_LOG_2PI = math.log(2.0 * math.pi)


def _as_columns(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """N×C vectors or a B×C×h×w map -> C×(B·h·w) columns (remembering the map shape)."""
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # half-precision embeddings would lose the log-det's precision
    if x.dim() == 4:
        b, c, h, w = x.shape
        return x.transpose(0, 1).reshape(c, -1).contiguous(), (b, c, h, w)
    if x.dim() == 2:
        return x.t().contiguous(), None
    raise ValueError(f"expected N×C vectors or a B×C×h×w map, got shape {tuple(x.shape)}")


def _from_columns(cols: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
    if shape is None:
        return cols.t()
    b, c, h, w = shape
    return cols.reshape(c, b, h, w).transpose(0, 1)


def _per_vector(values: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
    """Per-row scalars N -> B×h×w for a map input."""
    if shape is None:
        return values
    b, _, h, w = shape
    return values.reshape(b, h, w)


class AffineCoupling(nn.Module):
    """y_b = x_b·exp(s(x_a)) + t(x_a) on one half b, x_a unchanged (Real-NVP).

    Works on C×N columns. ``flip`` chooses which half conditions, so consecutive steps
    alternate.
    The log-scale is ``scale·tanh(raw)``: bounded, which keeps early training stable
    (the Real-NVP paper uses the same tanh-with-learnt-scale trick).
    """

    def __init__(self, channels: int, hidden: int, flip: bool) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling needs at least 2 channels, got {channels}")
        half = channels // 2
        # (a, b) = (conditioning, transformed) slices of the channel axis
        self.cond_slice = slice(half, channels) if flip else slice(0, half)
        self.trans_slice = slice(0, half) if flip else slice(half, channels)
        n_cond = channels - half if flip else half
        n_trans = channels - n_cond
        self.net = nn.Sequential(
            nn.Linear(n_cond, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2 * n_trans),
        )
        # Identity initialisation: s = t = 0 whatever the input.
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.scale = nn.Parameter(torch.ones(n_trans))

    def _log_scale_shift(self, xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = xa
        for layer in self.net:  # the MLP applied to columns: W·h + b
            if isinstance(layer, nn.Linear):
                h = torch.addmm(layer.bias[:, None], layer.weight, h)
            else:
                h = layer(h)
        raw_s, t = h.chunk(2, dim=0)
        return self.scale[:, None] * torch.tanh(raw_s), t

    def _join(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # the conditioning half a and the transformed half b back in channel order
        return torch.cat([b, a] if self.trans_slice.start == 0 else [a, b], dim=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xa, xb = x[self.cond_slice], x[self.trans_slice]
        log_s, t = self._log_scale_shift(xa)
        return self._join(xa, xb * torch.exp(log_s) + t), log_s.sum(dim=0)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        ya, yb = y[self.cond_slice], y[self.trans_slice]
        log_s, t = self._log_scale_shift(ya)
        return self._join(ya, (yb - t) * torch.exp(-log_s))


class FlowBatchNorm(nn.Module):
    """Real-NVP batch normalisation: y = γ·(x - m)/sqrt(v + ε) + β, with its log-det.

    Works on C×N columns (statistics over N). Training uses the batch statistics (and
    updates running ones); eval uses the running statistics, so the map is a fixed affine
    bijection and its log-det is exact.
    """

    def __init__(self, channels: int, momentum: float = 0.05, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and x.shape[1] > 1:
            mean = x.mean(dim=1)
            var = x.var(dim=1, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach(), self.momentum)
            return mean, var
        return self.running_mean, self.running_var

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = self._stats(x)
        log_scale = self.log_gamma - 0.5 * torch.log(var + self.eps)
        y = (x - mean[:, None]) * torch.exp(log_scale)[:, None] + self.beta[:, None]
        return y, log_scale.sum().expand(x.shape[1])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        # Inversion is only meaningful with fixed (running) statistics.
        log_std = 0.5 * torch.log(self.running_var + self.eps)
        scale = torch.exp(log_std - self.log_gamma)
        return (y - self.beta[:, None]) * scale[:, None] + self.running_mean[:, None]


class Permutation(nn.Module):
    """A fixed channel permutation of C×N columns (a buffer, so a saved flow replays the
    same order)."""

    def __init__(self, channels: int, generator: torch.Generator) -> None:
        super().__init__()
        perm = torch.randperm(channels, generator=generator)
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.index_select(0, self.perm), x.new_zeros(x.shape[1])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.index_select(0, self.inv_perm)


class RealNVP(nn.Module):
    """A stack of (coupling, batch norm, permutation) steps with a standard normal base.

    Args:
        channels: dimension C of the embedding vectors.
        steps: number of steps. The paper stacks 32 for 256-d DeepLab features; we
            default to 8, enough for the tiny segmenter's 16-64-d taps and 4× cheaper.
        hidden: width of the coupling MLPs.
        seed: seeds the fixed permutations, so the architecture is reproducible.
    """

    def __init__(self, channels: int, steps: int = 8, hidden: int = 64, seed: int = 0) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.channels = channels
        gen = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        for i in range(steps):
            layers += [
                AffineCoupling(channels, hidden, flip=bool(i % 2)),
                FlowBatchNorm(channels),
                Permutation(channels, gen),
            ]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N×C or B×C×h×w) -> (η of the same shape, log|det dη/dx| per vector)."""
        cols, shape = _as_columns(x)
        logdet = cols.new_zeros(cols.shape[1])
        for layer in self.layers:
            cols, ld = layer(cols)
            logdet = logdet + ld
        return _from_columns(cols, shape), _per_vector(logdet, shape)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """η -> x; exact in eval mode (batch norm then uses its running statistics)."""
        cols, shape = _as_columns(z)
        for layer in reversed(self.layers):
            cols = layer.inverse(cols)
        return _from_columns(cols, shape)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per vector (eq. 7): N×C -> N, B×C×h×w -> B×h×w."""
        z, logdet = self.forward(x)
        base = -0.5 * (z.pow(2).sum(dim=1) + self.channels * _LOG_2PI)
        return base + logdet
