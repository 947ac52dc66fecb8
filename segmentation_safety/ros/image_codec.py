"""sensor_msgs/Image <-> numpy, without depending on cv_bridge.

cv_bridge's Python binding crashes under NumPy 2 on Humble/Jazzy (vision_opencv #535)
and is not installable everywhere, so the numpy path is the one we rely on; cv_bridge is
used only where it imports and round-trips a probe image correctly, and a test checks
that both paths agree.

Decoding is a zero-copy view of ``msg.data`` for ``rgb8`` and ``rgba8`` (padding rows
are skipped through strides, the alpha channel through a slice). ``bgr8``, ``bgra8`` and
``mono8`` need one ``cv2.cvtColor`` copy: a reversed-channel view would have a negative
stride, which ``torch.as_tensor`` refuses, and a broadcast grey view is read-only. So do
what cameras send before any image_proc: packed YUV 4:2:2 (``uyvy``/``yuyv``, and their
older names ``yuv422``/``yuv422_yuy2``: USB and CSI cameras) and raw Bayer mosaics
(``bayer_rggb8`` and the other three orders: machine-vision cameras), converted as
cv_bridge converts them. The 16-bit encodings (``rgb16``, ``bgr16``, ``rgba16``,
``bgra16``, ``mono16``, ``bayer_*16``: machine-vision and HDR cameras) are read in the
byte order ``is_bigendian`` gives, converted at 16 bits, then scaled to 8 by 255/65535
and rounded, which is what ``cv_bridge``'s ``toCvCopy(msg, "rgb8")`` gives and what
compressed_image_transport puts in a 16-bit camera's jpeg. Drivers differ in where a
12- or 10-bit sensor's bits sit in the 16-bit word; ``bits`` < 16 says they fill only
the low ones (scale 255 / (2^bits - 1), saturated above).

sensor_msgs/CompressedImage (jpeg/png, as image_transport's ``compressed`` plugin or a
camera driver publishes it; a 16-bit png scaled to 8 bits as above) is decoded with
``cv2.imdecode``, not cv_bridge, for the same reason; its size is read from the file
header first so an oversized frame is refused before a large buffer is allocated.
"""

from __future__ import annotations

import io
import struct
import sys
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from sensor_msgs.msg import CompressedImage, Image

#: Packed YUV 4:2:2 (sensor_msgs' current names and the deprecated ones) -> conversion.
YUV422: dict[str, int] = {
    "uyvy": cv2.COLOR_YUV2RGB_UYVY,
    "yuv422": cv2.COLOR_YUV2RGB_UYVY,
    "yuyv": cv2.COLOR_YUV2RGB_YUY2,
    "yuv422_yuy2": cv2.COLOR_YUV2RGB_YUY2,
}
#: 8-bit Bayer mosaics -> conversion. OpenCV names a pattern by the 2×2 cell that starts
#: at the second row and column, ROS by the one at the first: rggb is OpenCV's "BG".
BAYER: dict[str, int] = {
    "bayer_rggb8": cv2.COLOR_BayerBG2RGB,
    "bayer_bggr8": cv2.COLOR_BayerRG2RGB,
    "bayer_gbrg8": cv2.COLOR_BayerGR2RGB,
    "bayer_grbg8": cv2.COLOR_BayerGB2RGB,
}

_TO_RGB = {
    "bgr8": cv2.COLOR_BGR2RGB,
    "bgra8": cv2.COLOR_BGRA2RGB,
    "mono8": cv2.COLOR_GRAY2RGB,
    "rgba8": cv2.COLOR_RGBA2RGB,
    **YUV422,
    **BAYER,
}

#: 8-bit input encodings -> bytes per pixel.
_EIGHT_BIT: dict[str, int] = {
    "rgb8": 3,
    "bgr8": 3,
    "mono8": 1,
    "rgba8": 4,
    "bgra8": 4,
    **dict.fromkeys(YUV422, 2),
    **dict.fromkeys(BAYER, 1),
}
#: 16-bit input encodings -> the 8-bit encoding with the same channels (and conversion).
SIXTEEN_BIT: dict[str, str] = {
    "rgb16": "rgb8",
    "bgr16": "bgr8",
    "rgba16": "rgba8",
    "bgra16": "bgra8",
    "mono16": "mono8",
    **{name[:-1] + "16": name for name in BAYER},
}
#: Input encodings the detector accepts -> bytes per pixel.
DECODABLE: dict[str, int] = {
    **_EIGHT_BIT,
    **{deep: 2 * _EIGHT_BIT[eight] for deep, eight in SIXTEEN_BIT.items()},
}
#: The significant bits ``bits`` may give a 16-bit pixel (cv_bridge's scale is 16's).
BITS_RANGE = (9, 16)
#: The brightest 8-bit level a 16-bit frame may peak at and still look like a camera
#: that fills only the low bits of its words (a 12-bit one peaks at 16 at ``bits`` 16).
DIM_PEAK = 16


class CodecError(ValueError):
    """An image message that cannot be decoded; the message says what is wrong with it.

    ``kind`` names the class of problem (encoding, empty, size, step, length, shape) so a
    node can rate-limit its warnings per kind. It never holds text from the message: a
    camera sending ever new encodings must not grow the node's list of kinds.
    """

    def __init__(self, message: str, kind: str = "input") -> None:
        super().__init__(message)
        self.kind = kind


def check_layout(msg: Image, max_pixels: int | None = None) -> int:
    """Validate encoding, size, step and data length; return the bytes per pixel."""
    enc = msg.encoding.lower()
    if enc not in DECODABLE:
        raise CodecError(
            f"unsupported encoding {msg.encoding!r}; supported: {', '.join(DECODABLE)}",
            "encoding",
        )
    h, w = int(msg.height), int(msg.width)
    if h == 0 or w == 0:
        raise CodecError(f"empty image ({w}x{h})", "empty")
    if max_pixels is not None and h * w > max_pixels:
        raise CodecError(
            f"image too large: {w}x{h} = {h * w} pixels > max_pixels {max_pixels}", "size"
        )
    bpp = DECODABLE[enc]
    if enc in YUV422 and w % 2:
        # Two pixels share one U and one V: an odd width leaves half a pair.
        raise CodecError(f"{enc} pairs pixels: its width must be even, got {w}", "shape")
    if msg.step < w * bpp:
        raise CodecError(f"step {msg.step} < width*channels {w * bpp} for {w}x{h} {enc}", "step")
    if len(msg.data) != msg.step * h:
        raise CodecError(
            f"data has {len(msg.data)} bytes, expected step*height = {msg.step * h} "
            f"({w}x{h} {enc}, step {msg.step})",
            "length",
        )
    return bpp


def decode_rgb(msg: Image, max_pixels: int | None = None, bits: int = 16) -> np.ndarray:
    """sensor_msgs/Image -> RGB uint8 H×W×3 (a view of ``msg.data`` where possible).

    The result may be non-contiguous (padded rows, dropped alpha); it must not outlive
    ``msg`` being modified. ``bits``: the significant bits of a 16-bit encoding's words.
    Raises :class:`CodecError` naming the problem.
    """
    bpp = check_layout(msg, max_pixels)
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    # Row-strided view: padding bytes at the end of each row are never read.
    rows = np.lib.stride_tricks.as_strided(buf, shape=(h, w, bpp), strides=(step, bpp, 1))
    enc = msg.encoding.lower()
    if enc in ("rgb8", "rgba8"):
        return rows[:, :, :3]
    if enc in SIXTEEN_BIT:
        return _decode_sixteen_bit(rows, enc, bool(msg.is_bigendian), bits)
    src = rows[:, :, 0] if bpp == 1 else rows
    # cvtColor wants rows with unit pixel stride; a padded view satisfies that.
    return cv2.cvtColor(src, _TO_RGB[enc])


def _decode_sixteen_bit(rows: np.ndarray, enc: str, big_endian: bool, bits: int) -> np.ndarray:
    """H×W×bpp bytes of a 16-bit encoding -> RGB uint8, in cv_bridge's order: colour
    conversion (or demosaicking) at 16 bits, then the scale to 8 bits, rounded."""
    h, w, bpp = rows.shape
    order = ">" if big_endian else "<"
    # One copy makes the rows contiguous (padding dropped); it is also what the 16-bit
    # view needs, and a swap to the host's byte order is done in it.
    values = np.ascontiguousarray(rows).view(order + "u2").reshape(h, w, bpp // 2)
    values = values.astype(np.uint16, copy=False)
    eight = SIXTEEN_BIT[enc]
    if eight != "rgb8":
        values = cv2.cvtColor(values[:, :, 0] if bpp == 2 else values, _TO_RGB[eight])
    return to_eight_bit(values, bits)


def to_eight_bit(values: np.ndarray, bits: int = 16) -> np.ndarray:
    """uint16 pixels whose low ``bits`` hold the intensity -> uint8: ×255/(2^bits - 1),
    rounded, saturated; at 16 bits what cv_bridge gives."""
    low, high = BITS_RANGE
    if not low <= bits <= high:
        raise ValueError(f"bits must be within {low}..{high}, got {bits}")
    return cv2.convertScaleAbs(values, alpha=255.0 / ((1 << bits) - 1))


#: A png file's first 8 bytes; its IHDR chunk follows, the bit depth at byte 24.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_sixteen_bit(msg: Any) -> bool:
    """Whether a frame carries 16-bit pixels: a 16-bit encoding, or a png whose header
    says 16 bits per sample (compressed_image_transport's for a 16-bit camera)."""
    if isinstance(msg, CompressedImage):
        head = bytes(msg.data[:25])
        return head[:8] == _PNG_SIGNATURE and head[24:25] == b"\x10"
    return msg.encoding.lower() in SIXTEEN_BIT


#: Depth encodings accepted -> (numpy dtype, metres per unit).
DEPTH_ENCODINGS: dict[str, tuple[str, float]] = {"32fc1": ("f4", 1.0), "16uc1": ("u2", 1e-3)}


def _check_depth_size(w: int, h: int, max_pixels: int | None) -> None:
    if h == 0 or w == 0:
        raise CodecError(f"empty depth image ({w}x{h})", "depth_empty")
    if max_pixels is not None and h * w > max_pixels:
        raise CodecError(f"depth image too large: {w}x{h} > max_pixels {max_pixels}", "size")


def _as_bytes(data: Any) -> bytes | bytearray | memoryview:
    # rclpy may hand a message's uint8[] over as array('B') or a list
    return data if isinstance(data, bytes | bytearray | memoryview) else bytes(data)


def decode_depth(msg: Image, max_pixels: int | None = None) -> np.ndarray:
    """Depth Image (32FC1 metres or 16UC1 millimetres) -> H×W float32 metres (a copy).

    Values are converted as they are; telling valid from invalid (0, NaN, inf) is left to
    :func:`segmentation_safety.ros.markers.valid_depth`. Raises :class:`CodecError`.
    """
    enc = msg.encoding.lower()
    if enc not in DEPTH_ENCODINGS:
        raise CodecError(
            f"unsupported depth encoding {msg.encoding!r}; supported: 32FC1, 16UC1",
            "depth_encoding",
        )
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    _check_depth_size(w, h, max_pixels)
    kind, scale = DEPTH_ENCODINGS[enc]
    dtype = np.dtype(kind).newbyteorder(">" if msg.is_bigendian else "<")
    if step < w * dtype.itemsize:
        raise CodecError(
            f"depth step {step} < width*{dtype.itemsize} bytes = {w * dtype.itemsize} for "
            f"{w}x{h} {msg.encoding}",
            "depth_step",
        )
    if len(msg.data) != step * h:
        raise CodecError(
            f"depth data has {len(msg.data)} bytes, expected step*height = {step * h} "
            f"({w}x{h} {msg.encoding}, step {step})",
            "depth_length",
        )
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    rows = np.lib.stride_tricks.as_strided(buf, shape=(h, w * dtype.itemsize), strides=(step, 1))
    values = np.ascontiguousarray(rows).view(dtype).astype(np.float32)
    return values * np.float32(scale) if scale != 1.0 else values


#: compressed_depth_image_transport's header before the png: its compression format
#: (an int32 enum) and the two inverse-depth quantisation parameters (float32).
COMPRESSED_DEPTH_HEADER = struct.Struct("<iff")


def decode_compressed_depth(msg: CompressedImage, max_pixels: int | None = None) -> np.ndarray:
    """A ``compressedDepth`` CompressedImage (image_transport's depth plugin) -> H×W
    float32 metres, as :func:`decode_depth` gives for the raw image.

    ``format`` is ``"16UC1; compressedDepth png"`` (millimetres in a 16-bit png) or
    ``"32FC1; compressedDepth png"`` (inverse depth quantised to 16 bits: a value v stands
    for A / (v - B) metres with A, B from the header, 0 for none); older publishers leave
    out the codec word. The plugin's ``rvl`` codec is refused by name. Raises
    :class:`CodecError`.
    """
    encoding, _, rest = msg.format.partition(";")
    encoding = encoding.strip().lower()
    words = rest.lower().split()
    if encoding not in DEPTH_ENCODINGS or not words or words[0] != "compresseddepth":
        raise CodecError(
            f"not a compressedDepth format: {msg.format!r}; expected e.g. "
            "'16UC1; compressedDepth png' or '32FC1; compressedDepth png'",
            "depth_format",
        )
    if words[1:] not in ([], ["png"]):
        raise CodecError(
            f"compressedDepth codec {' '.join(words[1:])!r} not supported (png only): set "
            "the publisher's compressedDepth format to png",
            "depth_format",
        )
    data = _as_bytes(msg.data)
    size = COMPRESSED_DEPTH_HEADER.size
    if len(data) <= size:
        raise CodecError(
            f"compressedDepth data of {len(data)} bytes: no png after its {size}-byte header",
            "depth_length",
        )
    _, quant_a, quant_b = COMPRESSED_DEPTH_HEADER.unpack_from(data)
    png = memoryview(data)[size:]
    w, h = compressed_size(png)
    _check_depth_size(w, h, max_pixels)
    values = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    if values is None or values.dtype != np.uint16 or values.shape != (h, w):
        got = "nothing" if values is None else f"{values.dtype} {values.shape}"
        raise CodecError(
            f"compressedDepth png must hold one 16-bit channel ({w}x{h}), decoded {got}",
            "undecodable",
        )
    if encoding == "16uc1":
        return values.astype(np.float32) * np.float32(DEPTH_ENCODINGS["16uc1"][1])
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.float32(quant_a) / (values.astype(np.float32) - np.float32(quant_b))
    depth[values == 0] = np.nan  # "no depth" (or beyond the publisher's depth_max)
    return depth


def _to_msg(array: np.ndarray, encoding: str, header: Any) -> Image:
    array = np.ascontiguousarray(array)
    h, w = array.shape[:2]
    msg = Image(
        height=h,
        width=w,
        encoding=encoding,
        is_bigendian=int(sys.byteorder == "big"),  # float maps go out in host order
        step=array.strides[0],
    )
    if header is not None:
        msg.header = header
    msg.data = array.reshape(-1).view(np.uint8).tobytes()
    return msg


def encode_mono8(labels: np.ndarray, header: Any = None) -> Image:
    """H×W uint8 (train ids) -> mono8 Image carrying ``header``."""
    if labels.ndim != 2:
        raise CodecError(f"mono8 needs an H×W array, got shape {labels.shape}", "shape")
    return _to_msg(labels.astype(np.uint8, copy=False), "mono8", header)


def encode_32fc1(values: np.ndarray, header: Any = None) -> Image:
    """H×W float map -> 32FC1 Image carrying ``header``."""
    if values.ndim != 2:
        raise CodecError(f"32FC1 needs an H×W array, got shape {values.shape}", "shape")
    return _to_msg(values.astype(np.float32, copy=False), "32FC1", header)


def encode_rgb8(image: np.ndarray, header: Any = None) -> Image:
    """H×W×3 uint8 RGB -> rgb8 Image carrying ``header``."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise CodecError(f"rgb8 needs an H×W×3 array, got shape {image.shape}", "shape")
    return _to_msg(image.astype(np.uint8, copy=False), "rgb8", header)


def empty_image(header: Any = None) -> Image:
    """A height-0 Image: how SafetyFrame says "this map was not produced"."""
    msg = Image()
    if header is not None:
        msg.header = header
    return msg


# -- CompressedImage ---------------------------------------------------------------------

#: Codecs a CompressedImage may carry.
COMPRESSED_CODECS = ("jpeg", "png")
#: Pixel layouts a camera's compressed frame may have been made from. A 16-bit camera's
#: jpeg holds the 8-bit pixels cv_bridge scaled it to; its png holds the 16-bit ones,
#: which decoding scales the same way. Depth (16UC1, 32FC1) is not a camera's picture.
COMPRESSED_ENCODINGS = (
    "bgr8",
    "rgb8",
    "mono8",
    "bgra8",
    "rgba8",
    "bgr16",
    "rgb16",
    "mono16",
    "bgra16",
    "rgba16",
)


def parse_compressed_format(fmt: str) -> tuple[str, bool]:
    """CompressedImage ``format`` -> (codec, whether the decoded BGR array is really RGB).

    Accepts what compressed_image_transport writes, ``"<encoding>; <codec> compressed
    <encoding of the compressed data>"`` (e.g. ``"rgb8; jpeg compressed bgr8"``; for a
    grey png it names none: ``"mono8; png compressed "``), and the bare
    ``"jpeg"``/``"jpg"``/``"png"`` many drivers write. imdecode assumes the file held
    BGR data; a publisher that compressed rgb8 bytes as they were ("... compressed rgb8")
    has therefore swapped the channels once already, and decoding swaps them back.
    """
    text = fmt.strip().lower()
    if not text:
        raise CodecError("empty CompressedImage format; expected e.g. 'jpeg' or 'png'", "format")
    head, _, rest = text.partition(";")
    words = (rest if rest else head).split()
    codec = {"jpg": "jpeg"}.get(words[0], words[0]) if words else ""
    if codec not in COMPRESSED_CODECS:
        raise CodecError(
            f"unsupported CompressedImage format {fmt!r}; supported codecs: jpeg, png",
            "format",
        )
    source = head.strip() if rest else ""
    packed = ""
    if len(words) >= 3 and words[1] == "compressed":
        packed = words[2]
    elif words[1:] not in ([], ["compressed"]):
        raise CodecError(f"cannot read CompressedImage format {fmt!r}", "format")
    for enc in (source, packed):
        if enc and enc not in COMPRESSED_ENCODINGS:
            raise CodecError(
                f"CompressedImage format {fmt!r}: encoding {enc!r} not supported; "
                f"supported: {', '.join(COMPRESSED_ENCODINGS)}",
                "format",
            )
    return codec, packed in ("rgb8", "rgba8", "rgb16", "rgba16")


def compressed_size(data: bytes | memoryview) -> tuple[int, int]:
    """(width, height) from a jpeg/png header, without decoding the pixels; a png's chunk
    lengths checked too (:func:`_check_png_chunks`)."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(data)) as im:
            size = im.size
    except PILImage.DecompressionBombError as e:
        raise CodecError(f"compressed image too large: {e}", "size") from None
    except PILImage.UnidentifiedImageError:  # its text holds the BytesIO's repr
        raise CodecError(
            f"compressed data is not a readable jpeg/png ({len(data)} bytes): not an image "
            "file PIL knows",
            "undecodable",
        ) from None
    except Exception as e:  # PIL raises several types for unreadable headers
        raise CodecError(
            f"compressed data is not a readable jpeg/png ({len(data)} bytes): {e}",
            "undecodable",
        ) from None
    if bytes(data[:8]) == _PNG_SIGNATURE:
        _check_png_chunks(data)
    return size


#: A png chunk's length field is at most 2^31 - 1 (PNG specification, 5.3).
_PNG_MAX_CHUNK = (1 << 31) - 1
_PNG_CHUNK_HEAD = struct.Struct(">I4s")  # length, type


def _check_png_chunks(data: bytes | bytearray | memoryview) -> None:
    """Refuse a png whose chunk headers claim more bytes than the file has.

    Why: OpenCV's png reader sizes its buffer from each chunk's claimed length before
    reading it (opencv modules/imgcodecs/src/grfmt_png.cpp), so a few hundred bytes that
    claim a 4 GB chunk made it allocate and zero 4 GB and stall for 9 s before refusing
    them: random corruption of a compressedDepth png did it too.
    """
    end, at = len(data), 8
    while at + 8 <= end:
        length, kind = _PNG_CHUNK_HEAD.unpack_from(data, at)
        if length > _PNG_MAX_CHUNK or at + 12 + length > end:
            raise CodecError(
                f"png chunk {kind!r} at byte {at} claims {length} bytes, more than the "
                f"{end - at} left in the file (truncated or corrupt)",
                "undecodable",
            )
        if kind == b"IEND":
            return
        at += 12 + length


@dataclass(frozen=True)
class CompressedFrame:
    """A CompressedImage's checked header: what to decode, and what it must decode to."""

    codec: str  # "jpeg" or "png"
    swapped: bool  # the file holds RGB bytes as if BGR: decoded channels come out swapped
    width: int
    height: int
    data: bytes | bytearray | memoryview
    format: str  # the message's, as given (for error messages)


def check_compressed(msg: CompressedImage, max_pixels: int | None = None) -> CompressedFrame:
    """The format, size and limits of a CompressedImage, read without decoding the pixels.

    Raises :class:`CodecError` for an empty, unreadable, oversized or unsupported image.
    """
    # The codec is the bytes' own, whatever the format names (as image_transport's
    # subscriber reads it), and so is a png's depth: a 16-bit png decodes to the 8-bit
    # pixels cv_bridge would give for it. Formats that would give wrong pixels (a depth
    # stream's, "16UC1; ...") are refused by the parse.
    codec, swapped = parse_compressed_format(msg.format)
    data = msg.data
    if len(data) == 0:
        raise CodecError("empty CompressedImage (no data)", "empty")
    data = _as_bytes(data)
    w, h = compressed_size(data)
    if w == 0 or h == 0:
        raise CodecError(f"empty compressed image ({w}x{h})", "empty")
    if max_pixels is not None and w * h > max_pixels:
        raise CodecError(
            f"image too large: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}", "size"
        )
    return CompressedFrame(codec, swapped, w, h, data, msg.format)


def check_decoded_size(frame: CompressedFrame, height: int, width: int) -> None:
    """Refuse pixels whose size is not the one the file's header gave."""
    if (height, width) != (frame.height, frame.width):  # a header that lies about the size
        raise CodecError(
            f"compressed image ({len(frame.data)} bytes, {frame.format!r}) decodes to "
            f"{width}x{height}, header says {frame.width}x{frame.height}",
            "undecodable",
        )


def decode_compressed(
    msg: CompressedImage, max_pixels: int | None = None, bits: int = 16
) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg/png) -> RGB uint8 H×W×3 (a new array).

    Raises :class:`CodecError` for an empty, unreadable, oversized or unsupported image.
    """
    return decode_checked(check_compressed(msg, max_pixels), bits)


def decode_checked(frame: CompressedFrame, bits: int = 16) -> np.ndarray:
    """A checked CompressedImage (:func:`check_compressed`) -> RGB uint8 H×W×3, decoded
    by OpenCV; a 16-bit png's low ``bits`` scaled to 8 (:func:`to_eight_bit`)."""
    # A camera's frames are as the sensor saw them: an EXIF orientation (phones, some
    # IP cameras) would turn them, and the header's size would no longer match.
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    if bytes(frame.data[:8]) == _PNG_SIGNATURE:  # the bytes', whatever the format says
        # 16 bits kept, to be scaled as cv_bridge scales (IMREAD_COLOR alone truncates).
        flags |= cv2.IMREAD_ANYDEPTH
    decoded = cv2.imdecode(np.frombuffer(frame.data, np.uint8), flags)
    if decoded is None:
        raise CodecError(
            f"compressed data ({len(frame.data)} bytes, {frame.format!r}) could not be decoded",
            "undecodable",
        )
    check_decoded_size(frame, *decoded.shape[:2])
    if decoded.dtype == np.uint16:
        decoded = to_eight_bit(decoded, bits)
    return decoded if frame.swapped else cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)


def encode_jpeg(image: np.ndarray, header: Any = None, quality: int = 90) -> CompressedImage:
    """H×W×3 uint8 RGB -> CompressedImage (jpeg) named as compressed_image_transport does."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise CodecError(f"jpeg needs an H×W×3 array, got shape {image.shape}", "shape")
    bgr = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise CodecError(f"jpeg encoding of a {image.shape} image failed", "encode")
    return jpeg_message(buf.tobytes(), header)


def jpeg_message(data: bytes, header: Any = None) -> CompressedImage:
    """A jpeg file's bytes, of an rgb8 picture, as compressed_image_transport names them.

    Its format says "compressed bgr8" because OpenCV hands the encoder BGR; the file
    itself is a standard jpeg whichever encoder wrote it, so decoders read it alike."""
    msg = CompressedImage(format="rgb8; jpeg compressed bgr8")
    if header is not None:
        msg.header = header
    msg.data = data
    return msg


# -- cv_bridge where it works ---------------------------------------------------------


def _probe_messages() -> list[Image]:
    """Every encoding we decode, padded rows, both byte-order flags: what a bridge meets.

    Upstream cv_bridge byte-swaps messages whose ``is_bigendian`` differs from the host
    with ``ndarray.newbyteorder``, removed in NumPy 2; a round trip of its own output
    never sets the flag, so the probe must send flagged messages to see the crash.
    """
    rng = np.random.default_rng(0)
    msgs = []
    for enc, bpp in DECODABLE.items():
        for big in (0, 1):
            h, w, pad = 2, 4, 2  # even: 4:2:2 pairs pixels
            data = rng.integers(0, 256, (h, w * bpp + pad), dtype=np.uint8)
            msgs.append(
                Image(
                    height=h,
                    width=w,
                    encoding=enc,
                    is_bigendian=big,
                    step=w * bpp + pad,
                    data=data.tobytes(),
                )
            )
    return msgs


def load_cv_bridge() -> Any | None:
    """A working ``CvBridge`` instance, or None where it is absent or broken.

    Broken means it imports but mis-converts or raises (the NumPy 2 crash) on any message
    the node accepts, so it must decode every probe exactly as the numpy path does.
    """
    try:
        from cv_bridge import CvBridge  # optional: absent or broken on many systems

        bridge = CvBridge()
        for msg in _probe_messages():
            got = np.asarray(bridge.imgmsg_to_cv2(msg, "rgb8"))
            if not np.array_equal(got, decode_rgb(msg)):
                return None
        return bridge
    except Exception:  # any failure at all means: use the numpy path
        return None


class ImageCodec:
    """Decoder/encoder that prefers cv_bridge where it works and numpy elsewhere.

    The numpy path is the default even when cv_bridge works: it is zero-copy for rgb8
    and already validated. ``prefer_cv_bridge=True`` routes decoding through cv_bridge
    (after our own validation, so errors read the same either way).
    """

    def __init__(
        self, prefer_cv_bridge: bool = False, max_pixels: int | None = None, bits: int = 16
    ) -> None:
        self.bridge = load_cv_bridge() if prefer_cv_bridge else None
        self.max_pixels = max_pixels
        self.bits = bits  # significant bits of 16-bit pixels (to_eight_bit)

    @property
    def backend(self) -> str:
        return "cv_bridge" if self.bridge is not None else "numpy"

    def decode(self, msg: Image | CompressedImage) -> np.ndarray:
        if isinstance(msg, CompressedImage):
            return decode_compressed(msg, self.max_pixels, self.bits)
        if self.bridge is None or (self.bits != 16 and msg.encoding.lower() in SIXTEEN_BIT):
            return decode_rgb(msg, self.max_pixels, self.bits)  # cv_bridge scales by 16 bits
        check_layout(msg, self.max_pixels)
        try:
            return self.bridge.imgmsg_to_cv2(msg, "rgb8")
        except Exception:  # a case the probe missed: the numpy path from now on
            self.bridge = None
            return decode_rgb(msg, self.max_pixels, self.bits)
