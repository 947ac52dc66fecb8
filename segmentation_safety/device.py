"""Choosing the torch device from a user's word: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""

from __future__ import annotations

import torch

from segmentation_safety.errors import UserError


class DeviceError(UserError, ValueError):
    """A device that was asked for and is not available here."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is refused clearly."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r} was asked for but CUDA is not available on this machine "
                "(no GPU, or a CPU-only PyTorch build); use device 'cpu' or 'auto'"
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)"
            )
        return dev
    raise DeviceError(f"unknown device {name!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so stage timings measure the work, not the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on_host(t: torch.Tensor) -> bool:
    """Whether ``t`` is in host memory, where the node's per-pixel tests run in numpy:
    this torch's CPU comparisons against a number are not vectorised (86 µs for a
    512×1024 float map against numpy's 24; 90 against 9 for uint8 labels)."""
    return t.device.type == "cpu"
