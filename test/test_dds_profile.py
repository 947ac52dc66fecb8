"""The launch file's dds_profile: which file each choice names, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from segmentation_safety.ros.dds_profile import (
    PROFILE_VARIABLE,
    SAME_HOST,
    ProfileError,
    profile_env,
    profile_path,
)

REPO = Path(__file__).resolve().parents[1]  # laid out as the installed share: config/...
SHIPPED = REPO / "config" / "fastdds_same_host.xml"


def test_same_host_is_the_shipped_profile_and_empty_keeps_the_environment():
    assert profile_path(SAME_HOST, REPO) == SHIPPED.resolve()
    assert profile_env(SAME_HOST, REPO, environ={}) == {PROFILE_VARIABLE: str(SHIPPED.resolve())}
    assert profile_path("", REPO) is None and profile_path("  ", REPO) is None
    assert profile_env("", REPO, environ={"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}) == {}


def test_a_file_of_ones_own_is_used_as_given(tmp_path):
    own = tmp_path / "mine.xml"
    own.write_text('<?xml version="1.0"?><dds xmlns="http://www.eprosima.com"><profiles/></dds>')
    env = profile_env(
        str(own), tmp_path / "no_share", environ={"RMW_IMPLEMENTATION": "rmw_fastrtps_cpp"}
    )
    assert env == {PROFILE_VARIABLE: str(own.resolve())}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no file"),
        ("<dds><profiles>", "not valid XML"),
        ("<launch/>", "not a Fast DDS profile"),
    ],
)
def test_a_profile_fast_dds_would_only_log_about_is_refused(tmp_path, content, problem):
    path = tmp_path / "profile.xml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ProfileError, match=problem) as e:
        profile_env(str(path), REPO, environ={})
    assert str(path) in str(e.value)
    with pytest.raises(ProfileError, match="no file"):
        profile_path("same-host", REPO)  # a misspelt choice is a missing file, not ignored


def test_another_middleware_is_refused_by_name():
    with pytest.raises(ProfileError, match="rmw_cyclonedds_cpp"):
        profile_env(SAME_HOST, REPO, environ={"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"})


def test_relative_and_home_paths_reach_the_process_as_absolute_ones(tmp_path, monkeypatch):
    # A launched process may start elsewhere: the variable names the file absolutely.
    (tmp_path / "conf").mkdir()
    own = tmp_path / "conf" / "mine.xml"
    own.write_text("<profiles/>")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for choice in ("conf/mine.xml", "~/conf/mine.xml", " ./conf/../conf/mine.xml "):
        assert profile_env(choice, REPO, environ={}) == {PROFILE_VARIABLE: str(own.resolve())}


def test_either_fast_dds_middleware_takes_the_profile():
    for rmw in ("rmw_fastrtps_cpp", "rmw_fastrtps_dynamic_cpp"):
        env = profile_env(SAME_HOST, REPO, environ={"RMW_IMPLEMENTATION": rmw})
        assert env == {PROFILE_VARIABLE: str(SHIPPED.resolve())}, rmw
