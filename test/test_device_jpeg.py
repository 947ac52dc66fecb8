"""JPEG on the pipeline's device: the same pixels as the host's decoder, readable files out.

The CPU stands in for the GPU here (torchvision's CPU codec); test_cuda.py runs nvJPEG.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from segmentation_safety import device_jpeg

CPU = torch.device("cpu")


def _host_decode(data: bytes) -> np.ndarray:
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), flags), cv2.COLOR_BGR2RGB)


def test_the_cpu_can_encode_and_decode():
    assert device_jpeg.problem(CPU) is None
    # An indexed device and the unindexed one its tensors report (on a GPU the other way
    # round: "cuda" resolves unindexed, its tensors say cuda:0) are the same device.
    assert device_jpeg.problem(torch.device("cpu:0")) is None


def test_a_tensor_is_on_a_device_whatever_index_either_names():
    t = torch.zeros(1)
    assert device_jpeg.on_device(t, torch.device("cpu"))
    assert device_jpeg.on_device(t, torch.device("cpu:0"))
    assert not device_jpeg.on_device(t, torch.device("meta"))


def test_decoded_colour_and_grey_jpegs_are_the_host_decoders_pixels():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:80]
    colour = np.stack([xx * 3, yy * 5, 255 - xx * 3], axis=2).astype(np.uint8)
    grey = rng.integers(0, 256, (37, 61), dtype=np.uint8)  # odd sizes, noise
    for picture in (colour, grey):
        data = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
        got = device_jpeg.decode(data, CPU)
        assert got.dtype == torch.uint8 and got.shape == (*picture.shape[:2], 3)
        np.testing.assert_array_equal(got.numpy(), _host_decode(data))


def test_real_jpegs_decode_to_the_host_decoders_pixels(real_data):
    frames = sorted((real_data / "roadanomaly" / "frames").glob("*.jpg"))[:3]
    if not frames:
        pytest.skip(f"no Road Anomaly JPEGs under {real_data}")
    for path in frames:
        data = path.read_bytes()
        np.testing.assert_array_equal(device_jpeg.decode(data, CPU).numpy(), _host_decode(data))


def test_encoded_bytes_are_a_jpeg_of_the_picture_and_bad_data_raises():
    yy, xx = np.mgrid[0:64, 0:96]
    rgb = np.stack([xx * 2, yy * 3, 255 - xx * 2], axis=2).astype(np.uint8)
    data = device_jpeg.encode(torch.from_numpy(rgb), 95)
    assert data.dtype == torch.uint8 and data.ndim == 1
    assert bytes(data[:2].tolist()) == b"\xff\xd8"  # a jpeg's start-of-image marker
    assert np.abs(_host_decode(data.numpy().tobytes()).astype(int) - rgb).mean() < 2
    with pytest.raises(RuntimeError):
        device_jpeg.decode(data.numpy().tobytes()[: data.numel() // 3], CPU)


def test_auto_encodes_on_a_gpu_but_leaves_frames_to_the_hosts_decoder():
    cuda, mps = torch.device("cuda"), torch.device("mps")  # devices named, never used
    assert device_jpeg.placement("auto", CPU) == device_jpeg.HOST
    for gpu in (cuda, mps):
        assert device_jpeg.placement("auto", gpu) == device_jpeg.Placement(False, True)
        assert device_jpeg.placement("device", gpu) == device_jpeg.Placement(True, True)
        assert device_jpeg.placement("host", gpu) == device_jpeg.HOST
    assert device_jpeg.placement("device", CPU) == device_jpeg.Placement(True, True)
    with pytest.raises(ValueError, match="auto, host or device"):
        device_jpeg.placement("gpu", cuda)
