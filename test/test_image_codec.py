"""sensor_msgs/Image and CompressedImage <-> numpy: every supported encoding, padded rows,
jpeg/png, and refusals by name."""

from __future__ import annotations

import sys
import types

import cv2
import numpy as np
import pytest

pytest.importorskip("sensor_msgs", reason="ROS 2 message packages are not installed")
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from segmentation_safety.ros import image_codec  # noqa: E402
from segmentation_safety.ros.image_codec import CodecError, decode_rgb  # noqa: E402

H, W = 5, 7


def _rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _msg(pixels: np.ndarray, encoding: str, pad: int = 0) -> Image:
    """Pack H×W×C pixels into an Image, with ``pad`` junk bytes after every row."""
    h, w = pixels.shape[:2]
    rows = pixels.reshape(h, -1)
    junk = np.full((h, pad), 0xAB, dtype=np.uint8)
    data = np.concatenate([rows, junk], axis=1)
    return Image(
        height=h,
        width=w,
        encoding=encoding,
        step=data.shape[1],
        data=data.tobytes(),
        is_bigendian=1,
    )


def _as(encoding: str, rgb: np.ndarray) -> np.ndarray:
    alpha = np.full(rgb.shape[:2] + (1,), 200, dtype=np.uint8)
    return {
        "rgb8": rgb,
        "bgr8": rgb[..., ::-1],
        "rgba8": np.concatenate([rgb, alpha], axis=2),
        "bgra8": np.concatenate([rgb[..., ::-1], alpha], axis=2),
    }[encoding]


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_colour_encodings_decode_to_rgb(encoding, pad):
    rgb = _rgb()
    out = decode_rgb(_msg(_as(encoding, rgb), encoding, pad))
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("pad", [0, 5])
def test_mono8_is_replicated_to_three_channels(pad):
    grey = _rgb()[..., 0]
    out = decode_rgb(_msg(grey[..., None], "mono8", pad))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))


def test_rgb8_decodes_as_a_view_of_the_message_data():
    msg = _msg(_rgb(), "rgb8", pad=4)
    out = decode_rgb(msg)
    assert np.shares_memory(out, np.frombuffer(msg.data, dtype=np.uint8))
    assert not out.flags.c_contiguous  # padded rows are skipped through the strides


def test_decoded_view_feeds_torch_without_a_copy_error():
    torch = pytest.importorskip("torch")
    out = decode_rgb(_msg(_as("rgba8", _rgb()), "rgba8", pad=2))
    assert torch.as_tensor(out).shape == (H, W, 3)


#: A colour per 2×2 cell position, the ROS way: "rggb" is R at row 0 column 0, G right of
#: it, G below it, B diagonally.
BAYER_ORDERS = ("rggb", "bggr", "gbrg", "grbg")


def _mosaic(rgb: np.ndarray, order: str) -> np.ndarray:
    """What a Bayer sensor behind ``order``'s filters records of ``rgb``."""
    out = np.empty(rgb.shape[:2], dtype=np.uint8)
    for (dy, dx), colour in zip([(0, 0), (0, 1), (1, 0), (1, 1)], order, strict=True):
        out[dy::2, dx::2] = rgb[dy::2, dx::2, "rgb".index(colour)]
    return out


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("order", BAYER_ORDERS)
def test_bayer_mosaics_decode_to_the_colours_they_recorded(order, pad):
    for colour in [(200, 30, 90), (10, 220, 40), (60, 70, 250)]:
        flat = np.empty((8, 10, 3), dtype=np.uint8)
        flat[:] = colour
        out = decode_rgb(_msg(_mosaic(flat, order)[..., None], f"bayer_{order}8", pad))
        assert out.shape == (8, 10, 3) and out.dtype == np.uint8
        # Away from the border (where demosaicking extrapolates) the flat colour comes
        # back exactly; any other of the four orders swaps or mixes channels.
        np.testing.assert_array_equal(out[2:-2, 2:-2], flat[2:-2, 2:-2], err_msg=order)


def _deep(rng_seed: int = 1, shape: tuple[int, ...] = (H, W, 3)) -> np.ndarray:
    """16-bit pixels over the whole range (not multiples of 257, so rounding shows)."""
    return np.random.default_rng(rng_seed).integers(0, 65536, size=shape, dtype=np.uint16)


def _eight(values: np.ndarray) -> np.ndarray:
    """cv_bridge's 16 -> 8 bit scale (×255/65535, rounded), in exact integers."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _msg16(pixels: np.ndarray, encoding: str, big: bool, pad: int = 0) -> Image:
    """16-bit H×W×C pixels in the byte order ``big`` says, rows padded by ``pad`` bytes."""
    data = pixels.astype(">u2" if big else "<u2").reshape(pixels.shape[0], -1)
    msg = _msg(data.view(np.uint8)[..., None], encoding, pad)
    msg.width, msg.is_bigendian = pixels.shape[1], int(big)
    return msg


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("encoding", ["rgb16", "bgr16", "rgba16", "bgra16", "mono16"])
def test_sixteen_bit_encodings_are_scaled_to_eight_bits_as_cv_bridge_does(encoding, pad, big):
    deep = _deep()
    alpha = np.full((H, W, 1), 40000, dtype=np.uint16)
    pixels = {
        "rgb16": deep,
        "bgr16": deep[..., ::-1],
        "rgba16": np.concatenate([deep, alpha], axis=2),
        "bgra16": np.concatenate([deep[..., ::-1], alpha], axis=2),
        "mono16": deep[..., :1],
    }[encoding]
    out = decode_rgb(_msg16(pixels, encoding, big, pad))
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    want = np.repeat(_eight(deep[..., :1]), 3, axis=2) if encoding == "mono16" else _eight(deep)
    np.testing.assert_array_equal(out, want)


def test_sixteen_bit_byte_order_is_the_messages_own():
    msg = _msg16(_deep(), "rgb16", big=True)
    msg.is_bigendian = 0  # the same bytes, read as little endian, are other pixels
    assert not np.array_equal(decode_rgb(msg), _eight(_deep()))


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("order", BAYER_ORDERS)
def test_sixteen_bit_bayer_mosaics_decode_to_the_colours_they_recorded(order, big):
    for colour in [(51400, 7710, 23130), (2570, 56540, 10280), (15420, 17990, 64250)]:
        flat = np.empty((8, 10, 3), dtype=np.uint16)
        flat[:] = colour
        mosaic = np.empty(flat.shape[:2], dtype=np.uint16)
        for (dy, dx), c in zip([(0, 0), (0, 1), (1, 0), (1, 1)], order, strict=True):
            mosaic[dy::2, dx::2] = flat[dy::2, dx::2, "rgb".index(c)]
        out = decode_rgb(_msg16(mosaic[..., None], f"bayer_{order}16", big, pad=2))
        assert out.shape == (8, 10, 3) and out.dtype == np.uint8
        # colour / 257 is whole here: demosaicked at 16 bits, then scaled, it comes back.
        np.testing.assert_array_equal(out[2:-2, 2:-2], _eight(flat)[2:-2, 2:-2], err_msg=order)


def test_sixteen_bit_frames_are_refused_by_size_as_eight_bit_ones():
    msg = _msg16(_deep(), "rgb16", big=False)
    msg.data = bytes(msg.data)[:-1]
    with pytest.raises(CodecError, match="expected step\\*height") as e:
        decode_rgb(msg)
    assert e.value.kind == "length"
    msg = _msg16(_deep(), "rgb16", big=False)
    msg.step = W * 3  # bytes of an 8-bit row: too short for 16-bit pixels
    with pytest.raises(CodecError, match=f"step {W * 3} < width\\*channels {W * 6}"):
        decode_rgb(msg)


def _yuv422(y: list[int], u: int, v: int, order: str) -> np.ndarray:
    """One row of packed 4:2:2 pixels, two per (U, V), as H×W×2 bytes."""
    pairs = []
    for y0, y1 in zip(y[::2], y[1::2], strict=True):
        pairs += [u, y0, v, y1] if order == "uyvy" else [y0, u, y1, v]
    return np.array(pairs, dtype=np.uint8).reshape(1, len(y), 2)


@pytest.mark.parametrize("pad", [0, 2])
@pytest.mark.parametrize(
    ("encoding", "order"),
    [("uyvy", "uyvy"), ("yuv422", "uyvy"), ("yuyv", "yuyv"), ("yuv422_yuy2", "yuyv")],
)
def test_packed_yuv422_decodes_each_pixel_in_its_byte_order(encoding, order, pad):
    # Grey (U = V = 128): a dark pixel left of a bright one, then BT.601 video-range red.
    grey = decode_rgb(_msg(_yuv422([41, 235, 41, 235], 128, 128, order), encoding, pad))
    assert grey.shape == (1, 4, 3)
    np.testing.assert_allclose(grey[0, :, 0], [29, 255, 29, 255], atol=2)
    assert (grey.max(axis=2) - grey.min(axis=2)).max() <= 1  # no colour cast
    red = decode_rgb(_msg(_yuv422([81, 81], 90, 240, order), encoding, pad))
    np.testing.assert_allclose(red[0].astype(int), [[255, 0, 0]] * 2, atol=2)


def _yuyv_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """RGB as a YUYV camera sends it: BT.601 video range, chroma averaged over pairs."""
    f = rgb.astype(np.float64) / 255
    y = 16 + f @ np.array([65.481, 128.553, 24.966])
    u = 128 + f @ np.array([-37.797, -74.203, 112.0])
    v = 128 + f @ np.array([112.0, -93.786, -18.214])
    packed = np.empty(rgb.shape[:2] + (2,))
    packed[..., 0] = y
    packed[:, 0::2, 1] = (u[:, 0::2] + u[:, 1::2]) / 2
    packed[:, 1::2, 1] = (v[:, 0::2] + v[:, 1::2]) / 2
    return np.clip(np.rint(packed), 0, 255).astype(np.uint8)


def test_real_frames_sent_as_bayer_and_yuyv_come_back_as_the_picture(real_data):
    frames = sorted((real_data / "roadanomaly" / "frames").glob("*.jpg"))
    if not frames:
        pytest.skip(f"no Road Anomaly JPEGs under {real_data / 'roadanomaly' / 'frames'}")
    for path in frames:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)

        def error(pixels: np.ndarray, encoding: str, rgb: np.ndarray = rgb) -> float:
            back = decode_rgb(_msg(pixels, encoding, pad=4))
            return float(np.abs(back.astype(int) - rgb).mean())

        mosaic = _mosaic(rgb, "rggb")[..., None]
        # Demosaicking loses detail (1-7 grey levels on these frames), the wrong order
        # swaps red and blue: several times more.
        right = error(mosaic, "bayer_rggb8")
        assert right < 8.0 and error(mosaic, "bayer_bggr8") > 2 * right, path.name
        packed = _yuyv_from_rgb(rgb)
        assert error(packed, "yuyv") < 2.0 and error(packed, "uyvy") > 10.0, path.name


def test_yuv422_with_an_odd_width_is_refused_by_name():
    msg = _msg(np.zeros((2, 3, 2), dtype=np.uint8), "yuyv")
    with pytest.raises(CodecError, match="yuyv pairs pixels: its width must be even, got 3"):
        decode_rgb(msg)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"encoding": "32FC1"}, "unsupported encoding '32FC1'"),
        ({"encoding": "nv21"}, "unsupported encoding 'nv21'"),
        ({"height": 0, "step": 0, "data": b""}, "empty image"),
        ({"step": W * 3 - 1}, "step"),
        ({"data": bytes(H * W * 3 - 4)}, "expected step*height"),
        ({"data": bytes(H * W * 3 + 1)}, "expected step*height"),
    ],
)
def test_bad_messages_are_refused_with_the_problem_named(change, words):
    msg = _msg(_rgb(), "rgb8")
    for key, value in change.items():
        setattr(msg, key, value)
    with pytest.raises(CodecError, match=words.replace("*", r"\*").replace("(", r"\(")):
        decode_rgb(msg)


def test_huge_images_are_refused_by_pixel_count():
    with pytest.raises(CodecError, match="too large.*max_pixels 20"):
        decode_rgb(_msg(_rgb(), "rgb8"), max_pixels=20)
    # The limit itself is allowed: 5x7 = 35 pixels pass max_pixels 35, not 34.
    np.testing.assert_array_equal(decode_rgb(_msg(_rgb(), "rgb8"), max_pixels=H * W), _rgb())
    with pytest.raises(CodecError, match="35 pixels > max_pixels 34"):
        decode_rgb(_msg(_rgb(), "rgb8"), max_pixels=H * W - 1)


def test_encoders_keep_the_header_and_round_trip():
    header = Header(frame_id="cam")
    header.stamp.sec, header.stamp.nanosec = 7, 11
    labels = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    values = np.linspace(-1, 1, H * W, dtype=np.float32).reshape(H, W)
    rgb = _rgb()
    m = image_codec.encode_mono8(labels, header)
    f = image_codec.encode_32fc1(values, header)
    c = image_codec.encode_rgb8(rgb, header)
    assert (m.encoding, m.step, m.header) == ("mono8", W, header)
    assert (f.encoding, f.step, f.header) == ("32FC1", W * 4, header)
    assert (c.encoding, c.step, c.header) == ("rgb8", W * 3, header)
    # Float maps go out in host byte order, and the flag says which.
    host_big = int(sys.byteorder == "big")
    assert (m.is_bigendian, f.is_bigendian, c.is_bigendian) == (host_big,) * 3
    np.testing.assert_array_equal(np.frombuffer(m.data, np.uint8).reshape(H, W), labels)
    np.testing.assert_array_equal(np.frombuffer(f.data, np.float32).reshape(H, W), values)
    np.testing.assert_array_equal(decode_rgb(c), rgb)


def test_encoders_refuse_wrong_shapes():
    with pytest.raises(CodecError, match="mono8 needs"):
        image_codec.encode_mono8(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(CodecError, match="rgb8 needs"):
        image_codec.encode_rgb8(np.zeros((2, 2), np.uint8))


def test_numpy_path_is_used_where_cv_bridge_is_absent_or_broken():
    codec = image_codec.ImageCodec(prefer_cv_bridge=True)
    if image_codec.load_cv_bridge() is None:
        assert codec.backend == "numpy"
    np.testing.assert_array_equal(codec.decode(_msg(_rgb(), "rgb8")), _rgb())


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize(
    "encoding", ["rgb8", "bgr8", "mono8", "rgba8", "bgra8", "rgb16", "bgr16", "mono16"]
)
def test_cv_bridge_and_numpy_paths_agree(encoding, pad):
    bridge = image_codec.load_cv_bridge()
    if bridge is None:
        pytest.skip(
            "cv_bridge is not importable here (or broken under NumPy 2, vision_opencv #535)"
        )
    if encoding.endswith("16"):
        deep = _deep()[..., :1] if encoding == "mono16" else _deep()
        msg = _msg16(deep[..., ::-1] if encoding == "bgr16" else deep, encoding, False, pad)
    else:
        pixels = _rgb()[..., :1] if encoding == "mono8" else _as(encoding, _rgb())
        msg = _msg(pixels, encoding, pad)
    np.testing.assert_array_equal(bridge.imgmsg_to_cv2(msg, "rgb8"), decode_rgb(msg))


# -- CompressedImage -------------------------------------------------------------------
def _compressed(rgb: np.ndarray, ext: str, fmt: str, swap: bool = True) -> CompressedImage:
    """Encode RGB pixels as a camera would: imencode expects BGR unless ``swap`` is off."""
    pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if swap else rgb
    ok, buf = cv2.imencode(ext, pixels)
    assert ok
    return CompressedImage(format=fmt, data=buf.tobytes())


@pytest.mark.parametrize(
    ("ext", "fmt"), [(".png", "png"), (".png", "bgr8; png compressed bgr8"), (".png", "PNG")]
)
def test_png_compressed_decodes_to_the_exact_rgb(ext, fmt):
    rgb = _rgb()
    out = image_codec.decode_compressed(_compressed(rgb, ext, fmt))
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


def test_rgb_data_compressed_unconverted_is_put_back_in_rgb_order():
    rgb = _rgb()
    # A publisher that handed rgb8 bytes to the encoder as they were says so in the format.
    msg = _compressed(rgb, ".png", "rgb8; png compressed rgb8", swap=False)
    np.testing.assert_array_equal(image_codec.decode_compressed(msg), rgb)


@pytest.mark.parametrize("fmt", ["jpeg", "jpg", "rgb8; jpeg compressed bgr8"])
def test_jpeg_compressed_decodes_close_to_the_source(fmt):
    # A smooth image: jpeg's loss stays small, and a channel swap would not.
    y, x = np.mgrid[0:32, 0:48]
    rgb = np.stack([x * 5, y * 7, np.full_like(x, 30)], axis=2).astype(np.uint8)
    out = image_codec.decode_compressed(_compressed(rgb, ".jpg", fmt))
    assert out.shape == (32, 48, 3)
    assert np.abs(out.astype(int) - rgb).mean() < 4


def test_codec_dispatches_compressed_messages():
    rgb = _rgb()
    codec = image_codec.ImageCodec(max_pixels=H * W)
    np.testing.assert_array_equal(codec.decode(_compressed(rgb, ".png", "png")), rgb)
    codec.max_pixels = H * W - 1
    with pytest.raises(CodecError, match="too large") as e:
        codec.decode(_compressed(rgb, ".png", "png"))
    assert e.value.kind == "size"


@pytest.mark.parametrize(
    ("fmt", "data", "kind", "words"),
    [
        ("jpeg", b"", "empty", "no data"),
        ("jpeg", b"\xff\xd8\xff not really a jpeg", "undecodable", "not a readable jpeg/png"),
        ("png", b"hello world", "undecodable", "not a readable"),
        ("h264", b"\x00\x00\x01", "format", "unsupported CompressedImage format 'h264'"),
        ("", b"x", "format", "empty CompressedImage format"),
        ("16UC1; compressedDepth png", b"x", "format", "unsupported"),
        ("16UC1; png compressed ", b"x", "format", "encoding '16uc1' not supported"),
        ("rgb8; png packed bgr8", b"x", "format", "cannot read"),
    ],
)
def test_bad_compressed_images_are_refused_by_kind(fmt, data, kind, words):
    with pytest.raises(CodecError, match=words) as e:
        image_codec.decode_compressed(CompressedImage(format=fmt, data=data))
    assert e.value.kind == kind
    assert " object at 0x" not in str(e.value)  # no Python object's repr in the message


def _png16(values: np.ndarray, fmt: str) -> CompressedImage:
    """A 16-bit png as compressed_image_transport writes one (BGR order for colour)."""
    pixels = values[..., ::-1] if values.shape[2] == 3 else values
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(pixels))
    assert ok
    return CompressedImage(format=fmt, data=buf.tobytes())


@pytest.mark.parametrize("source", ["rgb16", "bgr16", "rgba16"])
def test_a_sixteen_bit_cameras_png_is_scaled_as_cv_bridge_scales_it(source):
    deep = _deep()
    out = image_codec.decode_compressed(_png16(deep, f"{source}; png compressed bgr16"))
    np.testing.assert_array_equal(out, _eight(deep))  # rounded, not the top byte
    grey = image_codec.decode_compressed(_png16(deep[..., :1], "mono16; png compressed "))
    np.testing.assert_array_equal(grey, np.repeat(_eight(deep[..., :1]), 3, axis=2))


def test_input_bits_scales_a_cameras_low_bits_to_the_full_range():
    twelve = _deep()[..., :1] >> 4  # a 12-bit camera's words: the top 4 bits zero
    msg = _msg16(twelve, "mono16", big=True)
    exact = ((twelve.astype(np.uint32) * 510 + 4095) // 8190).astype(np.uint8)  # rounded
    np.testing.assert_array_equal(decode_rgb(msg, bits=12), np.repeat(exact, 3, axis=2))
    assert decode_rgb(msg).max() <= image_codec.DIM_PEAK  # at 16 bits: nearly black
    png = _png16(twelve, "mono16; png compressed ")
    np.testing.assert_array_equal(
        image_codec.decode_compressed(png, bits=12), np.repeat(exact, 3, axis=2)
    )
    over = _msg16(np.full((2, 2, 1), 5000, dtype=np.uint16), "mono16", big=False)
    assert (decode_rgb(over, bits=12) == 255).all()  # above 12 bits: saturated
    with pytest.raises(ValueError, match="bits must be within 9..16, got 8"):
        decode_rgb(msg, bits=8)


def test_sixteen_bit_frames_are_told_by_encoding_or_png_header():
    deep, rgb = _deep(), _rgb()
    assert image_codec.is_sixteen_bit(_png16(deep, "png"))
    assert not image_codec.is_sixteen_bit(_compressed(rgb, ".png", "png"))
    assert not image_codec.is_sixteen_bit(_compressed(rgb, ".jpg", "rgb16; jpeg compressed bgr8"))
    assert image_codec.is_sixteen_bit(_msg16(deep, "RGB16", big=False))
    assert not image_codec.is_sixteen_bit(_msg(rgb, "rgb8"))


def test_grey_png_as_compressed_image_transport_names_it_is_decoded():
    grey = _rgb()[..., :1]
    ok, buf = cv2.imencode(".png", grey)
    assert ok
    msg = CompressedImage(format="mono8; png compressed ", data=buf.tobytes())
    np.testing.assert_array_equal(image_codec.decode_compressed(msg), np.repeat(grey, 3, axis=2))


def test_a_sixteen_bit_cameras_jpeg_holds_its_eight_bit_picture():
    y, x = np.mgrid[0:32, 0:48]
    rgb = np.stack([x * 5, y * 7, np.full_like(x, 30)], axis=2).astype(np.uint8)
    out = image_codec.decode_compressed(_compressed(rgb, ".jpg", "rgb16; jpeg compressed bgr8"))
    assert np.abs(out.astype(int) - rgb).mean() < 4


def test_the_bytes_own_codec_is_decoded_and_16_bit_colour_becomes_8_bit():
    rgb = _rgb()
    for msg in (
        _compressed(rgb, ".png", "jpeg"),
        _compressed(rgb, ".png", "rgb8; jpeg compressed bgr8"),
    ):
        np.testing.assert_array_equal(image_codec.decode_compressed(msg), rgb)
    deep = _compressed(rgb.astype(np.uint16) * 257, ".png", "png")  # 16-bit, same picture
    np.testing.assert_array_equal(image_codec.decode_compressed(deep), rgb)


@pytest.mark.parametrize("size", [(32, 32), (32, 48)])
def test_an_exif_orientation_does_not_turn_the_frame(size):
    import io

    from PIL import Image as PILImage

    rgb = np.zeros((*size, 3), np.uint8)
    rgb[: size[0] // 4] = (255, 0, 0)  # a red top band, far from where a turn would put it
    im = PILImage.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif)
    out = image_codec.decode_compressed(CompressedImage(format="jpeg", data=buf.getvalue()))
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 3


def test_truncated_png_is_refused_as_undecodable():
    msg = _compressed(_rgb(), ".png", "png")
    msg.data = bytes(msg.data)[: len(msg.data) // 2]  # header intact, pixels cut
    with pytest.raises(CodecError) as e:
        image_codec.decode_compressed(msg)
    assert e.value.kind == "undecodable"


def _claim(png: bytes, chunk: bytes, length: int) -> bytes:
    """``png`` with ``chunk``'s length field set to ``length`` (its bytes left as they are)."""
    data = bytearray(png)
    at = data.index(chunk) - 4
    data[at : at + 4] = length.to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize("length", [0xFFFFFFF0, 0x10000000, 1 << 31])
def test_a_png_chunk_claiming_more_than_the_file_holds_is_refused_before_decoding(
    monkeypatch, length
):
    import struct

    # OpenCV sized its buffer from the claim first: 4 GB allocated for 500 bytes.
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded a chunk bomb"))
    png = bytes(_compressed(_rgb(), ".png", "png").data)
    msg = CompressedImage(format="png", data=_claim(png, b"IDAT", length))
    with pytest.raises(CodecError, match=rf"png chunk b'IDAT' at byte \d+ claims {length} bytes"):
        image_codec.decode_compressed(msg)
    ok, deep = cv2.imencode(".png", np.full((4, 6), 1500, np.uint16))
    depth = struct.pack("<iff", 0, 0.0, 0.0) + _claim(deep.tobytes(), b"IDAT", length)
    with pytest.raises(CodecError, match="png chunk b'IDAT'") as e:
        image_codec.decode_compressed_depth(
            CompressedImage(format="16UC1; compressedDepth", data=depth)
        )
    assert e.value.kind == "undecodable"


def test_a_sixteen_bit_png_named_jpeg_keeps_its_low_bits():
    twelve = _deep()[..., :1] >> 4
    exact = ((twelve.astype(np.uint32) * 510 + 4095) // 8190).astype(np.uint8)
    for fmt in ("jpeg", "bgr16; jpeg compressed bgr8"):  # the bytes' codec decides
        out = image_codec.decode_compressed(_png16(twelve, fmt), bits=12)
        np.testing.assert_array_equal(out, np.repeat(exact, 3, axis=2))


def test_a_depth_image_names_a_short_step_apart_from_a_wrong_length():
    with pytest.raises(CodecError, match=r"depth step 15 < width\*4 bytes = 16 for 4x2") as e:
        image_codec.decode_depth(
            Image(height=2, width=4, encoding="32FC1", step=15, data=bytes(30))
        )
    assert e.value.kind == "depth_step"
    with pytest.raises(CodecError, match=r"30 bytes, expected step\*height = 32") as e:
        image_codec.decode_depth(
            Image(height=2, width=4, encoding="32FC1", step=16, data=bytes(30))
        )
    assert e.value.kind == "depth_length"


def test_oversized_compressed_image_is_refused_before_decoding(monkeypatch):
    msg = _compressed(np.zeros((40, 50, 3), np.uint8), ".jpg", "jpeg")
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded despite its size"))
    with pytest.raises(CodecError, match=r"50x40 = 2000 pixels > max_pixels 1999") as e:
        image_codec.decode_compressed(msg, max_pixels=1999)
    assert e.value.kind == "size"


def test_jpeg_encoder_names_the_format_and_round_trips():
    header = Header(frame_id="cam")
    header.stamp.sec = 9
    y, x = np.mgrid[0:16, 0:24]
    rgb = np.stack([x * 9, y * 12, np.full_like(x, 200)], axis=2).astype(np.uint8)
    msg = image_codec.encode_jpeg(rgb, header, quality=95)
    assert msg.format == "rgb8; jpeg compressed bgr8" and msg.header == header
    assert bytes(msg.data[:2]) == b"\xff\xd8"  # JPEG start-of-image marker
    back = image_codec.decode_compressed(msg)
    assert np.abs(back.astype(int) - rgb).mean() < 3
    with pytest.raises(CodecError, match="jpeg needs"):
        image_codec.encode_jpeg(np.zeros((2, 2), np.uint8))


class _FakeBridge:
    """Stands in for cv_bridge.CvBridge: correct, or broken like upstream under NumPy 2."""

    broken_on_big_endian = False

    def imgmsg_to_cv2(self, msg: Image, desired_encoding: str) -> np.ndarray:
        assert desired_encoding == "rgb8"
        if msg.is_bigendian != (sys.byteorder == "big") and self.broken_on_big_endian:
            raise AttributeError("`newbyteorder` was removed from the ndarray class in NumPy 2.0")
        return np.ascontiguousarray(decode_rgb(msg))


def _install_fake_bridge(monkeypatch, broken: bool) -> None:
    bridge = type("CvBridge", (_FakeBridge,), {"broken_on_big_endian": broken})
    monkeypatch.setitem(sys.modules, "cv_bridge", types.SimpleNamespace(CvBridge=bridge))


def test_probe_refuses_a_bridge_that_breaks_on_big_endian_messages(monkeypatch):
    # Its own round trip never sets is_bigendian, so only a flagged probe sees the crash.
    _install_fake_bridge(monkeypatch, broken=True)
    assert image_codec.load_cv_bridge() is None
    codec = image_codec.ImageCodec(prefer_cv_bridge=True)
    assert codec.backend == "numpy"
    msg = _msg(_rgb(), "rgb8")  # is_bigendian=1, as the tests above send
    np.testing.assert_array_equal(codec.decode(msg), _rgb())


def test_probe_accepts_a_working_bridge_and_decoding_falls_back_if_it_fails(monkeypatch):
    _install_fake_bridge(monkeypatch, broken=False)
    codec = image_codec.ImageCodec(prefer_cv_bridge=True)
    assert codec.backend == "cv_bridge"
    np.testing.assert_array_equal(codec.decode(_msg(_as("bgr8", _rgb()), "bgr8", pad=3)), _rgb())
    codec.bridge.broken_on_big_endian = True  # a case the probe missed
    np.testing.assert_array_equal(codec.decode(_msg(_rgb(), "rgb8")), _rgb())
    assert codec.backend == "numpy"
