"""The launch file, its parameter file and the RViz config agree with the node and install."""

from __future__ import annotations

import ast
import py_compile
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "detector.launch.py"
CONFIG = REPO / "config" / "detector.yaml"
RVIZ = REPO / "config" / "detector.rviz"
ARGUMENTS = {"image", "camera_info", "config", "device", "namespace", "use_sim_time", "rviz"}


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == name
    ]


def _keyword(call: ast.Call, key: str) -> object:
    for kw in call.keywords:
        if kw.arg == key and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def test_launch_file_compiles(tmp_path):
    py_compile.compile(str(LAUNCH), cfile=str(tmp_path / "launch.pyc"), doraise=True)


def test_launch_file_declares_the_documented_arguments():
    tree = ast.parse(LAUNCH.read_text())
    declared = {c.args[0].value for c in _calls(tree, "DeclareLaunchArgument")}
    assert ARGUMENTS <= declared
    assert "generate_launch_description" in {
        n.name for n in tree.body if isinstance(n, ast.FunctionDef)
    }


def test_launch_file_names_an_installed_executable_and_existing_files():
    tree = ast.parse(LAUNCH.read_text())
    nodes = {_keyword(c, "executable"): _keyword(c, "package") for c in _calls(tree, "Node")}
    assert "detector_node" in nodes and "rviz2" in nodes
    assert (REPO / "scripts" / "detector_node").is_file()
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert "scripts/detector_node" in cmake and re.search(r"DIRECTORY\s+launch\s+config", cmake)
    text = LAUNCH.read_text()
    assert '"config", "detector.yaml"' in text and '"config", "detector.rviz"' in text
    assert CONFIG.is_file() and RVIZ.is_file()


def test_config_sets_only_declared_parameters_with_valid_values():
    pytest.importorskip("rclpy", reason="rclpy is needed to read the parameter table")
    from segmentation_safety.ros.params import SPEC_BY_NAME, validate

    params = yaml.safe_load(CONFIG.read_text())["/**"]["ros__parameters"]

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    values = flat(params)
    assert set(values) == set(SPEC_BY_NAME)  # the YAML documents every parameter
    for name, value in values.items():
        assert type(value) is type(SPEC_BY_NAME[name].default), name
        assert validate(name, value) is None, validate(name, value)


def test_config_values_are_the_node_defaults():
    """`ros2 run` without the YAML must behave as `ros2 launch` with it: one set of defaults."""
    pytest.importorskip("rclpy", reason="rclpy is needed to read the parameter table")
    from segmentation_safety.ros.params import SPECS

    params = yaml.safe_load(CONFIG.read_text())["/**"]["ros__parameters"]

    def lookup(dotted: str) -> object:
        node = params
        for part in dotted.split("."):
            node = node[part]
        return node

    # anomaly_threshold is left out on purpose: its default becomes the detector's own
    # calibrated operating point (read from its bundle), reworked in a separate change.
    disagree = {
        s.name: (lookup(s.name), s.default)
        for s in SPECS
        if s.name != "anomaly_threshold" and lookup(s.name) != s.default
    }
    assert not disagree, f"config/detector.yaml vs params.py SPECS (yaml, spec): {disagree}"


def test_rviz_config_shows_overlay_segmentation_maps_and_hazards():
    cfg = yaml.safe_load(RVIZ.read_text())
    displays = cfg["Visualization Manager"]["Displays"]
    topics = {
        d["Class"].split("/")[-1] + ":" + d["Topic"]["Value"] for d in displays if "Topic" in d
    }
    ns = "/segmentation_safety/"
    for topic in ("hazard_overlay", "segmentation/color", "anomaly", "failure"):
        assert f"Image:{ns}{topic}" in topics
    assert f"MarkerArray:{ns}hazards" in topics
    assert cfg["Visualization Manager"]["Global Options"]["Fixed Frame"]


def test_ros2_launch_loads_the_description():
    pytest.importorskip("launch_ros", reason="launch_ros is not installed (no ROS 2 distro here)")
    from launch.launch_description_sources import get_launch_description_from_python_launch_file

    description = get_launch_description_from_python_launch_file(str(LAUNCH))
    names = {a.name for a in description.get_launch_arguments()}
    assert ARGUMENTS <= names
