"""The package as a user's rosdep, colcon and pip see it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest
from conftest import REPO


def test_package_xml_is_format_3_and_names_runtime_dependencies():
    root = ET.parse(REPO / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3"
    assert root.findtext("name") == "segmentation_safety"
    deps = {e.text for e in root if e.tag.endswith("depend")}
    needed = {
        "rclpy",
        "sensor_msgs",
        "std_msgs",
        "visualization_msgs",
        "diagnostic_msgs",
        "cv_bridge",
        "launch_ros",
        "rosidl_default_generators",
        "rosidl_default_runtime",
        "python3-torch",
        "python3-torchvision",
        "python3-numpy",
        "python3-opencv",
        "python3-yaml",
    }
    assert needed <= deps, f"package.xml lacks {sorted(needed - deps)}"
    groups = [e.text for e in root.iter("member_of_group")]
    assert "rosidl_interface_packages" in groups
    # Keys rosdep cannot resolve make `rosdep install` stop before installing anything
    # (rosdistro has python3-rosbags-pip, and nothing for safetensors).
    assert not deps & {"python3-rosbags", "python3-safetensors"}


#: ROS packages imported only where present, each with a fallback.
OPTIONAL_ROS = {"vision_msgs", "message_filters", "rosbag2_py"}


def _imported_top_level(paths) -> set[str]:
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_every_ros_package_the_code_imports_is_declared():
    import os
    from pathlib import Path

    prefixes = [Path(p) for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    index = {
        entry.name
        for prefix in prefixes
        for entry in (prefix / "share/ament_index/resource_index/packages").glob("*")
    }
    if not index:
        pytest.skip("no ament index (AMENT_PREFIX_PATH unset): ROS packages cannot be told")
    code = [*(REPO / "segmentation_safety").rglob("*.py"), *(REPO / "launch").glob("*.py")]
    ros = (_imported_top_level(code) & index) - OPTIONAL_ROS - {"segmentation_safety"}
    root = ET.parse(REPO / "package.xml").getroot()
    deps = {e.text for e in root if e.tag.endswith("depend")}
    assert ros <= deps, f"package.xml lacks {sorted(ros - deps)}"


def test_core_imports_where_rclpy_cannot_be_found():
    # A GPU server that only trains has no ROS: every core module must import without it,
    # and the core must not pull in training/ either.
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys

        class NoRos:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"rclpy", "rosidl_runtime_py", "sensor_msgs",
                                          "std_msgs", "cv_bridge", "message_filters"}:
                    raise ImportError(f"blocked for this test: {name}")
                return None

        sys.meta_path.insert(0, NoRos())
        import segmentation_safety
        names = []
        for mod in pkgutil.walk_packages(segmentation_safety.__path__, "segmentation_safety."):
            if mod.name.startswith(("segmentation_safety.ros", "segmentation_safety.msg")):
                continue
            importlib.import_module(mod.name)
            names.append(mod.name)
        assert "rclpy" not in sys.modules
        assert "training" not in sys.modules, "the core imported training/"
        print(len(names))
        """
    )
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd="/", env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) >= 5


def training_imports(source: str) -> list[int]:
    """Lines of ``source`` that import ``training``, at any depth (functions included).

    A module path held in a string (the CLI's SUBCOMMANDS registry) is data, not an
    import; ``importlib.import_module`` / ``__import__`` with a literal name is one.
    """
    lines = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if called in ("import_module", "__import__") and isinstance(first, ast.Constant):
                names = [str(first.value)]
        if any(n == "training" or n.startswith("training.") for n in names):
            lines.append(node.lineno)
    return lines


def test_the_import_check_sees_imports_inside_functions_but_not_module_names_in_strings():
    planted = textwrap.dedent(
        """
        import importlib
        REGISTRY = {"make-bag": "training.make_bag_cli"}
        def run():
            from training.bags import write_bag
            import training.cli as cli
            return importlib.import_module("training.evaluate")
        """
    )
    assert training_imports(planted) == [5, 6, 7]
    assert training_imports("from trainingwheels import x\nimport segmentation_safety") == []


def test_runtime_never_imports_training():
    # The import test above only sees module-level imports that run; a `from training...`
    # inside a function would ship a runtime that breaks where training/ is not installed.
    offenders = []
    for path in sorted((REPO / "segmentation_safety").rglob("*.py")):
        for line in training_imports(path.read_text()):
            offenders.append(f"{path.relative_to(REPO)}:{line}")
    assert not offenders, f"the runtime imports training/: {offenders}"


#: Citations by the number of a file in the creators' paper folder (a three-digit number
#: before a section sign or in parentheses): a clone has no such numbering; papers are
#: cited by title and section instead.
PAPER_NUMBER = re.compile(
    r"\b00[0-4] §|\(00[0-4][,;)]|; 00[0-4]\)|paper 00[0-4]|\b00[0-4],? Table|\b00[0-4] suppl"
)


def test_papers_are_cited_by_title_not_by_a_file_number():
    assert PAPER_NUMBER.search("DenseHybrid detector (004 §3)")
    assert PAPER_NUMBER.search("ablation (003, Table 8)")
    assert not PAPER_NUMBER.search("lr: 0.001  # DenseHybrid §3.2, Table 5")
    found = []
    for folder in ("segmentation_safety", "training", "config", "docs", "launch", "test"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix not in {".py", ".md", ".yaml"} or "__pycache__" in path.parts:
                continue
            for n, line in enumerate(path.read_text().splitlines(), start=1):
                if PAPER_NUMBER.search(line) and "PAPER_NUMBER" not in line:
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "cite papers by title and section:\n" + "\n".join(found)


def test_a_user_error_ends_in_one_line_with_exit_2(capsys):
    from segmentation_safety.cli import main

    # --train -1 is the user's mistake: one line naming it, exit 2.
    assert main(["world", "--out", "/nonexistent/w", "--train", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("segsafe world: error: bad world size")


def test_a_bug_in_a_subcommand_keeps_its_traceback(monkeypatch):
    from segmentation_safety.cli import main
    from training.world import cli as world_cli

    def broken(*args, **kwargs):
        # A file this package should have shipped: a bug, which `except FileNotFoundError`
        # in the entry point once turned into exit 2 as if the user had mistyped a path.
        raise FileNotFoundError("package data missing")

    monkeypatch.setattr(world_cli, "write_world", broken)
    with pytest.raises(FileNotFoundError, match="package data"):
        main(["world", "--out", "/nonexistent/w"])


_MAJOR, _MINOR = sys.version_info[:2]
TAG = f"cp{_MAJOR}{_MINOR}"


def _offline_setup(tmp_path, wheels, python: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    env.update(SEGSAFE_WHEELS=str(wheels), PYTHON=python)
    return subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_offline_setup_refuses_wheels_for_another_python_before_writing_anything(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "ros_rclpy-9.1.2-cp399-cp399-manylinux_2_28_x86_64.whl").touch()
    before = sorted(p.name for p in REPO.iterdir())
    r = _offline_setup(tmp_path, wheels, sys.executable)
    assert r.returncode == 1
    assert f"no ROS 2 wheels for {TAG} in {wheels}" in r.stderr
    assert f"device_wheels.sh {_MAJOR}.{_MINOR}" in r.stderr
    assert sorted(p.name for p in REPO.iterdir()) == before


def test_offline_setup_names_the_modules_the_interpreter_lacks(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / f"ros_rclpy-9.1.2-{TAG}-{TAG}-manylinux_2_28_x86_64.whl").touch()
    r = _offline_setup(tmp_path, wheels, _bare_python(tmp_path))
    assert r.returncode == 1
    assert "lacks torch torchvision numpy PIL cv2 yaml safetensors scipy tqdm" in r.stderr


def _bare_python(tmp_path) -> str:
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    return str(bare / "bin" / "python")


def test_offline_setup_takes_the_wheels_archive_device_wheels_makes(tmp_path):
    import tarfile

    wheel = tmp_path / f"ros_rclpy-9.1.2-{TAG}-{TAG}-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"stand-in")
    archive = tmp_path / "whl.tar.xz"
    with tarfile.open(archive, "w:xz") as t:
        t.add(wheel, arcname=wheel.name)
    r = _offline_setup(tmp_path, archive, _bare_python(tmp_path))
    # Unpacked beside the archive, the wheels were found there: the next check speaks.
    assert f"unpacking {archive}" in r.stdout
    assert (tmp_path / "whl" / wheel.name).read_bytes() == b"stand-in"
    assert r.returncode == 1 and "lacks torch" in r.stderr
    again = _offline_setup(tmp_path, archive, _bare_python(tmp_path))
    assert "unpacking" not in again.stdout  # once per archive


def test_offline_setup_refuses_a_file_that_is_no_wheels_archive(tmp_path):
    wrong = tmp_path / "wheels.zip"
    wrong.write_bytes(b"PK")
    r = _offline_setup(tmp_path, wrong, sys.executable)
    assert r.returncode == 1
    assert "is a file but not a .tar.xz of wheels" in r.stderr


def _wait_for_a_signal(ready) -> None:  # noqa: ANN001
    import signal

    ready.set()
    signal.pause()


def test_a_forked_worker_still_ends_on_sigterm_under_the_cli_handler():
    # The handler turns SIGTERM into cleanup in segsafe's own process only: a forked
    # worker (a DataLoader's) that inherited it must end as SIGTERM ends any process.
    import multiprocessing
    import signal

    from segmentation_safety import cli

    previous = cli.handle_sigterm()
    try:
        fork = multiprocessing.get_context("fork")
        ready = fork.Event()
        child = fork.Process(target=_wait_for_a_signal, args=(ready,))
        child.start()
        assert ready.wait(20)
        child.terminate()
        child.join(20)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert child.exitcode == -signal.SIGTERM
