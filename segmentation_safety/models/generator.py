"""SPADE-style semantic-to-image generator and a multi-scale patch discriminator.

The resynthesis detector (SynthCP §3.1) turns a predicted label map back into an
image. Following SPADE (Park et al., CVPR 2019, as SynthCP uses it) the label map is the
generator's only input: it is downsampled to a small grid, convolved into features and
then, at every residual block, re-injected through spatially-adaptive normalisation.
There is no style encoder and no instance map (SynthCP §4.1, SynthCP supplementary §1.4).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from segmentation_safety.models.pointwise import PointwiseConv2d

IGNORE_INDEX = 255


def one_hot_labels(
    labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """B×H×W integer labels -> B×K×H×W float one-hot; ``ignore_index`` pixels are all zero."""
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes)
    if bool((~valid & (labels != ignore_index)).any()):
        raise ValueError(f"labels outside [0, {num_classes}) other than {ignore_index}")
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    onehot = F.one_hot(safe, num_classes).permute(0, 3, 1, 2).float()
    return onehot * valid.unsqueeze(1).float()


def _maybe_spectral(module: nn.Module, enabled: bool) -> nn.Module:
    return spectral_norm(module) if enabled else module


def _param_free_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=False)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False)
    raise ValueError(f"norm must be 'batch' or 'instance', got {kind!r}")


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: ``norm(x) * gamma(m) + beta(m)`` per pixel.

    ``m`` is the one-hot label map resized (nearest) to ``x``. The gamma branch predicts
    ``gamma - 1`` so that a freshly initialised layer is close to plain normalisation,
    as the official SPADE code does.
    """

    def __init__(
        self, channels: int, label_channels: int, hidden: int = 128, norm: str = "batch"
    ) -> None:
        super().__init__()
        self.norm = _param_free_norm(norm, channels)
        self.shared = nn.Sequential(
            nn.Conv2d(label_channels, hidden, 3, padding=1), nn.ReLU(inplace=True)
        )
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        normalized = self.norm(x)
        # Nearest keeps the map one-hot; bilinear would invent mixed classes at borders.
        seg = segmap
        if seg.shape[-2:] != x.shape[-2:]:
            seg = F.interpolate(segmap, size=x.shape[-2:], mode="nearest")
        hidden = self.shared(seg)
        return normalized * (1.0 + self.gamma(hidden)) + self.beta(hidden)


class SpadeResBlock(nn.Module):
    """SPADE residual block: two SPADE-LeakyReLU-conv3x3 steps plus a (learned) shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        label_channels: int,
        hidden: int = 128,
        norm: str = "batch",
        spectral: bool = True,
    ) -> None:
        super().__init__()
        mid = min(in_channels, out_channels)
        self.norm_0 = SPADE(in_channels, label_channels, hidden, norm)
        self.conv_0 = _maybe_spectral(nn.Conv2d(in_channels, mid, 3, padding=1), spectral)
        self.norm_1 = SPADE(mid, label_channels, hidden, norm)
        self.conv_1 = _maybe_spectral(nn.Conv2d(mid, out_channels, 3, padding=1), spectral)
        self.learned_shortcut = in_channels != out_channels
        if self.learned_shortcut:
            self.norm_s = SPADE(in_channels, label_channels, hidden, norm)
            self.conv_s = _maybe_spectral(
                PointwiseConv2d(in_channels, out_channels, bias=False), spectral
            )

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, segmap)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, segmap), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, segmap), 0.2))
        return shortcut + dx


def _pyramid_sizes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """Sizes from the coarsest grid up to (height, width), halving (ceil) ``levels`` times."""
    sizes = [(height, width)]
    for _ in range(levels):
        h, w = sizes[0]
        sizes.insert(0, ((h + 1) // 2, (w + 1) // 2))
    return sizes


class SpadeGenerator(nn.Module):
    """Label map -> image in [-1, 1] (tanh).

    Layout of SPADE's "normal" generator: a conv on the label map downsampled
    ``num_upsampling`` times, a head block, then per upsampling step (nearest ×2) one
    SPADE residual block (two at the first step, SPADE's middle blocks), channel widths
    ``ngf * min(16, 2**(num_upsampling - i))``. Any input size works: every step
    upsamples to the exact size of the next pyramid level.
    """

    def __init__(
        self,
        num_classes: int,
        ngf: int = 64,
        num_upsampling: int = 5,
        hidden: int = 128,
        norm: str = "batch",
        spectral: bool = True,
    ) -> None:
        super().__init__()
        if num_upsampling < 1:
            raise ValueError("num_upsampling must be at least 1")
        self.num_classes = num_classes
        self._arch = {
            "ngf": ngf,
            "num_upsampling": num_upsampling,
            "hidden": hidden,
            "norm": norm,
            "spectral": spectral,
        }
        widths = [ngf * min(16, 2 ** (num_upsampling - i)) for i in range(num_upsampling + 1)]
        self.num_upsampling = num_upsampling

        def block(cin: int, cout: int) -> SpadeResBlock:
            return SpadeResBlock(cin, cout, num_classes, hidden, norm, spectral)

        self.fc = nn.Conv2d(num_classes, widths[0], 3, padding=1)
        self.head = block(widths[0], widths[0])
        self.middle = block(widths[0], widths[0])
        self.ups = nn.ModuleList(block(widths[i], widths[i + 1]) for i in range(num_upsampling))
        self.conv_img = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def architecture(self) -> dict[str, Any]:
        """Builder kwargs for bundle metadata; :func:`build_generator` inverts it."""
        return {"name": "spade", "num_classes": self.num_classes, **self._arch}

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels``: B×H×W class ids (255 = void) or a B×K×H×W one-hot map -> B×3×H×W."""
        segmap = labels if labels.dim() == 4 else one_hot_labels(labels, self.num_classes)
        if segmap.shape[1] != self.num_classes:
            raise ValueError(f"expected {self.num_classes} label channels, got {segmap.shape[1]}")
        sizes = _pyramid_sizes(segmap.shape[-2], segmap.shape[-1], self.num_upsampling)
        # The label map at each level, resized once for all the SPADE layers there.
        levels = [F.interpolate(segmap, size=s, mode="nearest") for s in sizes[:-1]] + [segmap]
        x = self.fc(levels[0])
        x = self.head(x, levels[0])
        for i, up in enumerate(self.ups):
            x = F.interpolate(x, size=sizes[i + 1], mode="nearest")
            if i == 0:
                x = self.middle(x, levels[1])
            x = up(x, levels[i + 1])
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))


def build_generator(architecture: dict[str, Any]) -> SpadeGenerator:
    """Rebuild a generator from :meth:`SpadeGenerator.architecture` (bundle metadata)."""
    arch = dict(architecture)
    name = arch.pop("name", "spade")
    if name != "spade":
        raise ValueError(f"unknown generator architecture {name!r}")
    return SpadeGenerator(**arch)


class PatchDiscriminator(nn.Module):
    """One PatchGAN (pix2pixHD/SPADE NLayerDiscriminator) on label map ⊕ image.

    Returns every intermediate activation; the last one is the patch real/fake score map.
    The intermediate ones feed the feature-matching loss.
    """

    def __init__(
        self, in_channels: int, ndf: int = 64, n_layers: int = 4, spectral: bool = True
    ) -> None:
        super().__init__()
        kw, pad = 4, 2
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, ndf, kw, stride=2, padding=pad), nn.LeakyReLU(0.2))
        ]
        nf = ndf
        for n in range(1, n_layers):
            prev, nf = nf, min(nf * 2, 512)
            stride = 1 if n == n_layers - 1 else 2
            conv = _maybe_spectral(nn.Conv2d(prev, nf, kw, stride=stride, padding=pad), spectral)
            layers.append(
                nn.Sequential(conv, nn.InstanceNorm2d(nf, affine=False), nn.LeakyReLU(0.2))
            )
        layers.append(nn.Sequential(nn.Conv2d(nf, 1, kw, stride=1, padding=pad)))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MultiscaleDiscriminator(nn.Module):
    """``num_d`` patch discriminators on the input at successively halved resolution.

    Conditioned on the label map by concatenating its one-hot encoding to the image.
    Output: per scale, the list of activations of :class:`PatchDiscriminator`.
    """

    def __init__(
        self,
        num_classes: int,
        ndf: int = 64,
        n_layers: int = 4,
        num_d: int = 2,
        spectral: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.discriminators = nn.ModuleList(
            PatchDiscriminator(num_classes + 3, ndf, n_layers, spectral) for _ in range(num_d)
        )

    def forward(self, labels: torch.Tensor, image: torch.Tensor) -> list[list[torch.Tensor]]:
        segmap = labels if labels.dim() == 4 else one_hot_labels(labels, self.num_classes)
        x = torch.cat([segmap, image], dim=1)
        outputs = []
        for i, disc in enumerate(self.discriminators):
            if i > 0:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            outputs.append(disc(x))
        return outputs
