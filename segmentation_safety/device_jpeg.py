"""JPEG encoded and decoded on the pipeline's device (nvJPEG on CUDA, via torchvision).

A node on a GPU otherwise decodes every compressed camera frame and encodes every jpeg
overlay on the host: at 1024×2048 about 10 ms and 5 ms of CPU per frame, and the full
picture crosses the bus where a few hundred kB of jpeg would do. On a CPU OpenCV is as
fast or faster (docs/performance.md), so the node uses this only where it pays
(``jpeg_codec``, :func:`placement`). torchvision 0.29 deprecates these functions in
favour of TorchCodec's; :func:`problem` lets a caller find out at start whether they
work where it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    """Which jpeg work runs on the pipeline's device (the rest on the host, by OpenCV)."""

    decode: bool  # camera frames sent as jpeg
    encode: bool  # the hazard overlay's jpeg


HOST = Placement(decode=False, encode=False)


def placement(choice: str, device: torch.device) -> Placement:
    """``jpeg_codec`` ("auto", "host" or "device") on ``device`` -> where each runs.

    auto: on a GPU the overlay is encoded there, since it is a picture for people and
    nvJPEG's rounding changes nothing the node decides; frames are still decoded on the
    host, so that the network sees libjpeg-turbo's pixels, the ones `segsafe evaluate`
    and `calibrate` read, and the operating points hold as calibrated (ESPNetv2's
    scores move with single intensity levels, docs/real-data.md). device: both on the
    device. On a CPU, auto is the host for both (OpenCV is as fast or faster there).
    """
    if choice == "host" or (choice == "auto" and device.type == "cpu"):
        return HOST
    if choice == "auto":
        return Placement(decode=False, encode=True)
    if choice == "device":
        return Placement(decode=True, encode=True)
    raise ValueError(f"jpeg_codec {choice!r}: expected auto, host or device")


def encode(rgb: torch.Tensor, quality: int) -> torch.Tensor:
    """H×W×3 uint8 RGB -> the jpeg file's bytes (1-D uint8), on ``rgb``'s device."""
    from torchvision.io import encode_jpeg  # noqa: PLC0415 (only the jpeg outputs need it)

    chw = rgb.permute(2, 0, 1).contiguous()
    _settle(chw.device)
    data = encode_jpeg(chw, quality=int(quality))
    _settle(chw.device)
    return data


def _settle(device: torch.device) -> None:
    """Let the device finish what is queued before and after torchvision's CUDA codec.

    It runs nvJPEG on a stream of its own, and releases have not always ordered it after
    the caller's: its output memory could be a block freed a moment ago that kernels
    still queued on the caller's stream go on reading (pytorch/vision #9606, a decode
    report), and the encoder could read its picture before it was written until a fix of
    February 2025 (#8929). The GPU image lent to us has 0.26; setup.py allows 0.16 on. One
    synchronisation either side costs little on a frame that waits for its outputs
    anyway, and none of this process's work is then in flight beside the codec."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(data: bytes | bytearray | memoryview, device: torch.device) -> torch.Tensor:
    """A jpeg file's bytes -> H×W×3 uint8 RGB on ``device`` (grey files as three equal
    channels; an EXIF orientation is not applied, as a camera's frames are as sensed).
    Raises what torchvision raises for data it cannot decode."""
    from torchvision.io import ImageReadMode, decode_jpeg  # noqa: PLC0415

    # A copy of the few hundred kB: torch reads only writable buffers without a warning.
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    _settle(device)
    rgb = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    _settle(device)
    return rgb.permute(1, 2, 0)


def on_device(t: torch.Tensor, device: torch.device) -> bool:
    """``t`` is on ``device``: the same type, and the same index where both name one.
    ``torch.device("cuda")`` (what ``device: cuda`` and ``auto`` resolve to) is not equal
    to the ``cuda:0`` its tensors report, which made every GPU look jpeg-less."""
    index = device.index
    return t.device.type == device.type and (
        index is None or t.device.index is None or t.device.index == index
    )


def problem(device: torch.device) -> str | None:
    """Why :func:`encode` or :func:`decode` cannot run on ``device`` (None: both can).
    torchvision has CUDA jpeg from 0.19 on, with its image extension and nvJPEG."""
    try:
        picture = torch.zeros(16, 16, 3, dtype=torch.uint8, device=device)
        picture[4:12, 4:12, 0] = 255
        data = encode(picture, 90)
        if not on_device(data, device) or data.dtype != torch.uint8:
            return f"encode_jpeg gave a {data.dtype} tensor on {data.device}"
        back = decode(data.cpu().numpy().tobytes(), device)
    except Exception as e:  # ImportError, RuntimeError (no nvJPEG, old torchvision), ...
        return f"{type(e).__name__}: {e}".strip()
    if back.shape != picture.shape or not on_device(back, device):
        return f"decode_jpeg gave shape {tuple(back.shape)} on {back.device}"
    if (back.int() - picture.int()).abs().float().mean() > 8:
        return "a jpeg encoded and decoded there came back with other pixels"
    return None
