"""FlowEneDet (FlowEneDet supplementary, UAI 2023; DESIGN §4): an energy-based normalising flow that
turns the frozen segmenter's logits into P(segmentation wrong) per pixel.

Per pixel: logits are standardised per class as in SML, E = -logsumexp(standardised),
z = [log σ(-E), log(1 - σ(-E))]. A flow of L blocks (ActNorm, invertible 1×1 conv,
affine coupling with a K×K conv subnet) maps z to u, and a 2-component Gaussian
mixture scores u. The components' joint log-likelihoods log w_k + log N(u|μ_k, Σ_k) +
log|det| are the logits of {correct, wrong}; training is cross-entropy against
"segmentation wrong here". FED-C also conditions each coupling on a channel-average-
pooled (P = 32) copy of the decoder features.

Choices where the official code and the brief differ (documented, tested):
- The base is a true mixture: each component has its own 2-d mean and full
  covariance. The official code scores the two rows of one whitened Gaussian instead.
- U is the square root of the *precision*, Σ_k⁻¹ = U_kᵀ U_k, lower-triangular with a
  softplus-positive diagonal (1 at initialisation), as the official ``U`` is.
- Couplings use a bounded log-scale 2·tanh(raw/2) with a zero-initialised last layer,
  so every coupling starts as the identity; the official scale σ(-raw) ∈ (0, 1) starts
  at 1/2. Padding of the K×K conv is replicate (official: reflect), which also works on
  maps smaller than K.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segmentation_safety.models.class_reductions import logsumexp_classes
from segmentation_safety.models.log_sigmoid import log_sigmoid
from segmentation_safety.models.pointwise import PointwiseConv2d, pointwise

_LOG_2PI = math.log(2.0 * math.pi)
_INV_SOFTPLUS0 = 1.0 / math.log(2.0)  # softplus(0)·this = 1


# --------------------------------------------------------------------------- flow input


def standardize_logits(logits: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """SML standardisation per class channel: (l_k - m_k) / s_k on B×K×h×w."""
    return (logits - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def energy_flow_input(logits: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """B×K×h×w logits -> B×2×h×w z = [log σ(-E), log(1 - σ(-E))], E = -logsumexp.

    log(1 - σ(a)) = log σ(-a), so both entries come from log σ without the
    cancellation of computing 1 - σ.
    """
    neg_energy = logsumexp_classes(standardize_logits(logits.float(), mean, std))
    return torch.stack([log_sigmoid(neg_energy), log_sigmoid(-neg_energy)], dim=1)


def pool_matrix(
    channels_in: int,
    channels: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The P×C matrix of channel average pooling (FED-C's a^P).

    Output j averages input channels floor(j·C/P) .. ceil((j+1)·C/P) - 1: adaptive pooling
    over channels, which for C divisible by P is the official mean over groups of C/P
    consecutive channels.
    """
    weight = torch.zeros(channels, channels_in, dtype=dtype, device=device)
    for j in range(channels):
        lo, hi = (j * channels_in) // channels, -((-(j + 1) * channels_in) // channels)
        weight[j, lo:hi] = 1.0 / (hi - lo)
    return weight


def pool_condition(features: torch.Tensor, channels: int) -> torch.Tensor:
    """Average-pool the channel axis of B×C×h×w features to ``channels`` (FED-C's a^P)."""
    weight = pool_matrix(features.shape[1], channels, features.dtype, features.device)
    return F.conv2d(features, weight[:, :, None, None])


# --------------------------------------------------------------------------- flow layers


class ActNorm(nn.Module):
    """Glow ActNorm: y = (x + bias)·exp(log_scale) per channel; log-det Σ log_scale per pixel.

    With ``data_init`` the first training batch sets bias/scale so outputs have zero mean
    and unit variance per channel (Glow); ``initialized`` is a buffer so a loaded model
    never re-initialises.
    """

    def __init__(self, channels: int, data_init: bool = True) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0.0 if data_init else 1.0))

    @torch.no_grad()
    def _data_init(self, x: torch.Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(1.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized) and x.numel() > x.shape[1]:
            self._data_init(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = self.log_scale.sum().expand(x.shape[0], x.shape[2], x.shape[3])
        return y, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class InvConv1x1(nn.Module):
    """Glow invertible 1×1 convolution (plain weight)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels))  # random rotation
        self.weight = nn.Parameter(q)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = pointwise(x, self.weight)
        logdet = self.log_abs_det().expand(x.shape[0], x.shape[2], x.shape[3])
        return y, logdet

    def log_abs_det(self) -> torch.Tensor:
        """ln |det W|; for the 2×2 of FlowEneDet's energy pair in closed form: slogdet's
        LU took about 90 µs a block on the CPU, which four blocks pay every frame."""
        w = self.weight
        if w.shape == (2, 2):
            return torch.log(torch.abs(w[0, 0] * w[1, 1] - w[0, 1] * w[1, 0]))
        return torch.linalg.slogdet(w)[1]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return pointwise(y, torch.linalg.inv(self.weight.double()).to(y.dtype))


class ConvCoupling(nn.Module):
    """Affine coupling on a map: one channel half conditions (plus the FED-C context),
    the other is scaled and shifted. Subnet: 1×1 conv, K×K conv, 1×1 conv (zero init).

    The first conv reads [conditioning half, P condition channels]; the condition part
    arrives already applied (``context``: hidden channels, see FlowEneDet.context).
    """

    def __init__(
        self,
        channels: int,
        flip: bool,
        cond_channels: int = 0,
        hidden: int = 32,
        kernel_size: int = 7,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        half = channels // 2
        self.cond_slice = slice(half, channels) if flip else slice(0, half)
        self.trans_slice = slice(0, half) if flip else slice(half, channels)
        n_cond = channels - half if flip else half
        n_trans = channels - n_cond
        self.n_cond = n_cond
        self.pad = kernel_size // 2
        self.inp = nn.Conv2d(n_cond + cond_channels, hidden, 1)
        self.mid = nn.Conv2d(hidden, hidden, kernel_size)
        self.drop = nn.Dropout2d(dropout)
        self.out = PointwiseConv2d(hidden, 2 * n_trans)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def context_weight(self) -> torch.Tensor:
        """The part of the first 1×1 conv that reads the FED-C condition (hidden×P)."""
        return self.inp.weight[:, self.n_cond :, 0, 0]

    def _log_scale_shift(
        self, xa: torch.Tensor, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # ``context`` is the condition already pushed through this coupling's share of
        # the first conv (FlowEneDet.context), so only the flow channel is convolved here.
        h = pointwise(xa, self.inp.weight[:, : self.n_cond, 0, 0], self.inp.bias)
        if context is not None:
            h = h + context
        # Sigmoid activations follow the official subnet.
        h = torch.sigmoid(h)
        h = F.pad(h, (self.pad,) * 4, mode="replicate") if self.pad else h
        h = self.drop(torch.sigmoid(self.mid(h)))
        raw_s, t = self.out(h).chunk(2, dim=1)
        return 2.0 * torch.tanh(raw_s / 2.0), t

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        log_s, t = self._log_scale_shift(x[:, self.cond_slice], context)
        y = x.clone()
        y[:, self.trans_slice] = x[:, self.trans_slice] * torch.exp(log_s) + t
        return y, log_s.sum(dim=1)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        log_s, t = self._log_scale_shift(y[:, self.cond_slice], context)
        x = y.clone()
        x[:, self.trans_slice] = (y[:, self.trans_slice] - t) * torch.exp(-log_s)
        return x


class GaussianMixture(nn.Module):
    """M-component Gaussian mixture over D-d pixel vectors (FED: M = D = 2).

    Parameters (all zero at initialisation, as in the paper): mixture logits ``w``
    (log w = log_softmax(w)), means ``mu`` M×D, and the entries of lower-triangular U_k:
    diagonal softplus(raw)/log 2 (> 0, 1 at init) and free off-diagonals.
    U_k is the square root of the precision: Σ_k⁻¹ = U_kᵀ U_k, so
    log N(u|μ_k, Σ_k) = Σ_i log U_k,ii - ½‖U_k (u - μ_k)‖² - D/2·log 2π.
    """

    def __init__(self, dim: int = 2, components: int = 2) -> None:
        super().__init__()
        self.dim = dim
        self.components = components
        self.w = nn.Parameter(torch.zeros(components))
        self.mu = nn.Parameter(torch.zeros(components, dim))
        self.diag_raw = nn.Parameter(torch.zeros(components, dim))
        self.register_buffer("tril_idx", torch.tril_indices(dim, dim, offset=-1), persistent=False)
        self.offdiag = nn.Parameter(torch.zeros(components, self.tril_idx.shape[1]))

    def precision_factor(self) -> torch.Tensor:
        """U as an M×D×D tensor (lower-triangular, positive diagonal)."""
        diag = F.softplus(self.diag_raw) * _INV_SOFTPLUS0
        u = torch.diag_embed(diag)
        rows, cols = self.tril_idx
        comp = torch.arange(self.components, device=u.device)[:, None]
        return u.index_put((comp, rows, cols), self.offdiag)

    def component_log_prob(self, u: torch.Tensor) -> torch.Tensor:
        """log w_k + log N(u|μ_k, Σ_k) for B×D×h×w input -> B×M×h×w."""
        factor = self.precision_factor()
        diff = u[:, None] - self.mu.view(1, self.components, self.dim, 1, 1)
        white = torch.einsum("mij,bmjhw->bmihw", factor, diff)
        log_det = torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum(dim=-1)
        log_n = log_det.view(1, -1, 1, 1) - 0.5 * white.pow(2).sum(dim=2)
        log_n = log_n - 0.5 * self.dim * _LOG_2PI
        return F.log_softmax(self.w, dim=0).view(1, -1, 1, 1) + log_n


# --------------------------------------------------------------------------- the model


class FlowEneDet(nn.Module):
    """The FED network over a frozen segmenter's logits (and, for FED-C, its features).

    Args:
        num_classes: K logit channels (size of the SML buffers).
        feature_channels: channels of the pre-logit features (used by FED-C only).
        conditional: FED-C if true, FED-U otherwise.
        blocks: L (4 for DeepLab, 8 for SegFormer in the paper).
        kernel_size: K of the coupling subnet's conv (7).
        cond_channels: P, length of the pooled condition (32).
        hidden: channels of the coupling subnet.
        dropout: dropout inside the subnet during training (official: 0.2).
        data_init: data-dependent ActNorm initialisation on the first training batch.
    """

    def __init__(
        self,
        num_classes: int,
        feature_channels: int = 0,
        conditional: bool = False,
        blocks: int = 4,
        kernel_size: int = 7,
        cond_channels: int = 32,
        hidden: int = 32,
        dropout: float = 0.2,
        data_init: bool = True,
    ) -> None:
        super().__init__()
        dim = 2
        self.conditional = conditional
        self.cond_channels = cond_channels if conditional else 0
        self.register_buffer("class_mean", torch.zeros(num_classes))
        self.register_buffer("class_std", torch.ones(num_classes))
        self.context_norm = ActNorm(cond_channels, data_init) if conditional else None
        self.actnorms = nn.ModuleList(ActNorm(dim, data_init) for _ in range(blocks))
        self.invconvs = nn.ModuleList(InvConv1x1(dim) for _ in range(blocks))
        self.couplings = nn.ModuleList(
            ConvCoupling(dim, bool(i % 2), self.cond_channels, hidden, kernel_size, dropout)
            for i in range(blocks)
        )
        self.base = GaussianMixture(dim, 2)

    def flow_input(self, logits: torch.Tensor) -> torch.Tensor:
        """B×K×h×w logits -> B×2×h×w energy input z."""
        return energy_flow_input(logits, self.class_mean, self.class_std)

    def context(self, features: torch.Tensor | None, size: torch.Size) -> torch.Tensor | None:
        """FED-C condition at the flow's resolution, as each coupling's first conv sees it
        (B×(L·hidden)×h×w, coupling i in the i-th block of channels); None for FED-U.

        Channel pooling, the condition's ActNorm and the couplings' 1×1 convs over the
        condition are all affine per pixel, so they are folded into one C -> L·hidden
        map; bilinear resizing commutes with it, so whichever of the two has fewer
        channels is resized. Mathematically the same as concatenating the pooled,
        normalised condition to every coupling's input, at a fraction of the cost.
        """
        if not self.conditional:
            return None
        if features is None:
            raise ValueError("FED-C needs the segmenter's pre-logit features")
        features = features.to(self.context_norm.bias.dtype)  # fp16 under autocast: out
        if self.training and not bool(self.context_norm.initialized):
            self.context_norm(pool_condition(features, self.cond_channels))  # data init
        weight, bias = self._context_projection(features.shape[1], features.device)
        resize = features.shape[-2:] != size
        if resize and features.shape[1] <= weight.shape[0]:
            features = F.interpolate(features, size=size, mode="bilinear", align_corners=False)
            resize = False
        # The couplings add these terms to maps in the plain layout; a channels-last
        # condition (the node's frames make the features so) would make every one of
        # those adds a slow strided one, so the narrower input is made plain here.
        terms = F.conv2d(features.contiguous(), weight[:, :, None, None], bias)
        if resize:
            terms = F.interpolate(terms, size=size, mode="bilinear", align_corners=False)
        return terms

    def _context_projection(
        self, channels_in: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (L·hidden)×C, bias) of features -> every coupling's condition term."""
        norm = self.context_norm
        scale = torch.exp(norm.log_scale).view(1, -1)
        heads = torch.cat([c.context_weight() for c in self.couplings]) * scale
        pool = pool_matrix(channels_in, self.cond_channels, heads.dtype, device)
        return heads @ pool, heads @ norm.bias.view(-1)

    def forward_flow(
        self, z: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z -> (u, log|det du/dz| per pixel B×h×w)."""
        logdet = z.new_zeros(z.shape[0], z.shape[2], z.shape[3])
        terms = self._split_context(context)
        for norm, conv, coupling, term in zip(
            self.actnorms, self.invconvs, self.couplings, terms, strict=True
        ):
            z, ld_norm = norm(z)
            z, ld_conv = conv(z)
            z, ld_coupling = coupling(z, term)
            logdet = logdet + ld_norm + ld_conv + ld_coupling
        return z, logdet

    def inverse_flow(self, u: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """u -> z (exact inverse of :meth:`forward_flow` for the same context)."""
        terms = self._split_context(context)
        for norm, conv, coupling, term in zip(
            reversed(self.actnorms),
            reversed(self.invconvs),
            reversed(self.couplings),
            reversed(terms),
            strict=True,
        ):
            u = norm.inverse(conv.inverse(coupling.inverse(u, term)))
        return u

    def _split_context(self, context: torch.Tensor | None) -> list[torch.Tensor | None]:
        """:meth:`context`'s output -> one condition term per coupling."""
        if context is None:
            return [None] * len(self.couplings)
        return list(context.chunk(len(self.couplings), dim=1))

    def forward(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Joint log-likelihoods log p(z, k) for k in (correct, wrong): B×2×h×w.

        These are the logits of the {correct, wrong} classifier. The flow's log-det is
        shared by both components, so it shifts them equally and leaves P(wrong) as is.
        """
        z = self.flow_input(logits)
        u, logdet = self.forward_flow(z, self.context(features, z.shape[-2:]))
        return self.base.component_log_prob(u) + logdet[:, None]

    def p_wrong(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """P(segmentation wrong) per pixel, B×h×w in [0, 1]."""
        return torch.softmax(self.forward(logits, features), dim=1)[:, 1]
