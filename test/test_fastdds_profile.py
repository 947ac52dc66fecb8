"""config/fastdds_same_host.xml: loads, takes effect, and carries a 2 MP map between processes."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from segmentation_safety.ros.dds_profile import profile_env, uses_fast_dds

pytest.importorskip("rclpy", reason="rclpy (ROS 2 Kilted wheels) is not installed")

pytestmark = [
    pytest.mark.ros,
    pytest.mark.skipif(
        not uses_fast_dds(),
        reason="a Fast DDS profile; RMW_IMPLEMENTATION names another middleware",
    ),
]
PROFILE = Path(__file__).resolve().parents[1] / "config" / "fastdds_same_host.xml"
NS = {"dds": "http://www.eprosima.com"}

#: Publishes one 32FC1 Image of 1024x2048 (8 MB) on /big once a subscriber matched, waits
#: until it is acknowledged (reliable: a reader that matched later still gets it), then
#: until its stdin closes (its shared-memory segment stays while the test looks at it).
PUBLISHER = """
import sys, time, numpy as np, rclpy
from rclpy.duration import Duration
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
rclpy.init()
node = rclpy.create_node("big_pub")
qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
pub = node.create_publisher(Image, "big", qos)
msg = Image(height=1024, width=2048, encoding="32FC1", step=8192)
msg.data = np.full(1024 * 8192, 7, np.uint8).tobytes()
deadline = time.monotonic() + 30.0
while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
    rclpy.spin_once(node, timeout_sec=0.1)
pub.publish(msg)
pub.wait_for_all_acked(Duration(seconds=30))
sys.stdin.read()
"""

#: Prints the size of the first message on /big, then exits.
SUBSCRIBER = """
import rclpy
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
rclpy.init()
node = rclpy.create_node("big_sub")
got = []
node.create_subscription(Image, "big", lambda raw: got.append(len(raw)),
                         QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE), raw=True)
while not got:
    rclpy.spin_once(node, timeout_sec=0.5)
print("received", got[0], flush=True)
"""


def test_profile_is_a_shared_memory_only_participant():
    root = ET.parse(PROFILE).getroot()  # well-formed XML
    transport = root.find(".//dds:transport_descriptor", NS)
    assert transport.findtext("dds:type", namespaces=NS) == "SHM"
    segment = int(transport.findtext("dds:segment_size", namespaces=NS))
    largest = int(transport.findtext("dds:maxMessageSize", namespaces=NS))
    # A 2 MP float map (8 MB) in one piece, `safety` at 1024x2048 (18 MB) in three; not
    # more: every process loading the profile keeps about ten such buffers resident.
    assert largest == 8 * 2**20 and segment >= 8 * largest
    participant = root.find(".//dds:participant", NS)
    assert participant.get("is_default_profile") == "true"
    assert participant.findtext(".//dds:useBuiltinTransports", namespaces=NS) == "false"


def test_profile_carries_a_2mp_float_map_between_processes(tmp_path: Path):
    # The environment the launch file's dds_profile:=same_host gives the node and RViz.
    env = {**os.environ, **profile_env("same_host", PROFILE.parents[1]),
           "ROS_DOMAIN_ID": str(100 + os.getpid() % 100)}  # fmt: skip
    before = _segments()
    sub = subprocess.Popen([sys.executable, "-P", "-c", SUBSCRIBER], env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    pub = subprocess.Popen([sys.executable, "-P", "-c", PUBLISHER], env=env, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)  # fmt: skip
    try:
        out, err = sub.communicate(timeout=60)
        # The profile took effect: its segments (64 MB, not Fast DDS's default 512 KB).
        new = {name: size for name, size in _segments().items() if name not in before}
    finally:
        try:
            _, pub_err = pub.communicate(timeout=40)  # closing its stdin ends it
        except subprocess.TimeoutExpired:
            pub.kill()
            _, pub_err = pub.communicate()
        sub.kill()
    assert sub.returncode == 0, err
    word, size = out.split()
    assert word == "received" and 1024 * 8192 < int(size) < 1024 * 8192 + 100  # pixels + header
    assert "rror" not in err + pub_err  # an XML that does not parse is only logged
    assert any(size >= 64 * 2**20 for size in new.values()), new


def _segments() -> dict[str, int]:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    out = {}
    for p in shm.glob("fastdds_*"):
        try:
            out[p.name] = p.stat().st_size
        except FileNotFoundError:  # another process's segment, just removed
            pass
    return out
