"""A real, non-symlinked `colcon build` of the package into a fresh build and install space."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.ros


@pytest.fixture(scope="module")
def install_space(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("colcon") is None:
        pytest.skip("colcon is not on PATH (run through `make test`)")
    base = tmp_path_factory.mktemp("colcon")
    done = subprocess.run(
        [
            "colcon",
            "--log-base",
            str(base / "log"),
            "build",
            "--base-paths",
            str(REPO),
            "--build-base",
            str(base / "build"),
            "--install-base",
            str(base / "install"),
            "--cmake-args",
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DBUILD_TESTING=OFF",
            *_numpy_include_arg(),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return base / "install"


def _numpy_include_arg() -> list[str]:
    # Same fix-up as scripts/setup.sh: the venv sits inside the source tree.
    import sysconfig

    import numpy

    rel = os.path.relpath(numpy.get_include(), sysconfig.get_paths()["purelib"])
    return [
        f"-DPython3_NumPy_INCLUDE_DIR=/opt/python/cp311-cp311/lib/python3.11/site-packages/{rel}"
    ]


def _run_in(install: Path, code: str) -> subprocess.CompletedProcess[str]:
    shell = f'source "{install}/setup.bash" && cd / && "{sys.executable}" -c "$SEGSAFE_CODE"'
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["SEGSAFE_CODE"] = code
    return subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True)


def test_messages_and_python_modules_import_together_from_the_install_space(install_space):
    site = install_space / "segmentation_safety" / "lib" / "python3.11" / "site-packages"
    code = (
        "import segmentation_safety, segmentation_safety.msg as m, "
        "segmentation_safety.checkpoint, segmentation_safety.detectors;"
        "print(segmentation_safety.__file__);"
        "print(m.SafetyFrame.__name__, m.HazardAlarm.__name__, m.StageTiming.__name__)"
    )
    done = _run_in(install_space, code)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    assert first.startswith(str(site)), "segmentation_safety did not come from the install space"
    assert not Path(first).is_symlink(), "expected a real (non-symlink) install"
    assert second == "SafetyFrame HazardAlarm StageTiming"


def test_executables_launch_and_config_are_installed(install_space):
    pkg = install_space / "segmentation_safety"
    assert os.access(pkg / "lib" / "segmentation_safety" / "detector_node", os.X_OK)
    assert os.access(pkg / "lib" / "segmentation_safety" / "segsafe", os.X_OK)
    share = pkg / "share" / "segmentation_safety"
    for name in ("package.xml", "launch", "config", "msg/SafetyFrame.msg"):
        assert (share / name).exists(), name
    done = _run_in(install_space, "import training; print(training.__file__)")
    assert done.returncode == 0, done.stderr
    # The demo models ship in share/ and are what `--models` defaults to from an install.
    assert (share / "models" / "demo" / "segmenter.safetensors").is_file()
    done = _run_in(
        install_space, "from segmentation_safety.pipeline import DEMO_MODELS; print(DEMO_MODELS)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(share / "models" / "demo")
