"""Trainers end to end on a tiny synthetic world: bundles load, resume is exact, DDP agrees.

Everything is tiny (32×64 images, TinySegmenter width 4, a few iterations) so the file
runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from segmentation_safety.checkpoint import Bundle, BundleError, load_bundle, save_bundle
from segmentation_safety.pipeline import Pipeline, PipelineConfig
from training import cli, engine

REPO = Path(__file__).resolve().parent.parent
H, W = 32, 64

TINY = {
    "device": "cpu",
    "architecture_options": {"width": 4, "dropout": 0.1},
    "iterations": 4,
    "batch_size": 2,
    "crop_size": [H, W],
    "workers": 0,
    "checkpoint_every": 2,
    "log_every": 1,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.world import write_world

    root = tmp_path_factory.mktemp("world")
    write_world(root, seed=0, train=4, val=2, anomaly=1, sequences=0, height=H, width=W,
                negatives=2, progress=False)  # fmt: skip
    return root


def write_config(path: Path, **values: object) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def train(model: str, data: Path, out: Path, config: Path | None = None, *extra: str) -> int:
    argv = [model, "--data", str(data), "--out", str(out)]
    if config is not None:
        argv += ["--config", str(config)]
    return cli.main([*argv, *extra])


@pytest.fixture(scope="module")
def models(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with a tiny segmenter, trained once for the whole module."""
    root = tmp_path_factory.mktemp("models")
    config = write_config(root / "segmenter.yaml", **TINY)
    assert train("segmenter", world, root / "segmenter.safetensors", config) == 0
    return root


def test_segmenter_bundle(models: Path):
    bundle = load_bundle(models / "segmenter.safetensors", kind="segmenter")
    meta = bundle.metadata
    assert meta["architecture"]["name"] == "tiny"
    assert len(meta["class_names"]) == 19
    assert meta["input_size"] == [H, W]
    assert 0.0 <= meta["metrics"]["val_miou"] <= 1.0
    assert meta["training"]["config"]["iterations"] == 4
    assert (models / "segmenter.safetensors.ckpt").is_file()
    assert list((models / "segmenter.safetensors.runs").iterdir())  # TensorBoard events


def test_resume_equals_uninterrupted(world: Path, tmp_path: Path):
    config = write_config(tmp_path / "c.yaml", **TINY)
    assert train("segmenter", world, tmp_path / "full.safetensors", config) == 0
    killed = tmp_path / "killed.safetensors"
    assert train("segmenter", world, killed, config, "--stop-after", "2") == 0
    assert not killed.exists() and Path(f"{killed}.ckpt").is_file()
    # What a kill during a write leaves (atomic_write_bytes' temporary files): a resume
    # removes them.
    partials = [
        tmp_path / ".killed.safetensors.x1.tmp",
        tmp_path / ".killed.safetensors.ckpt.x2.tmp",
    ]
    for partial in partials:
        partial.write_bytes(b"half")
    assert train("segmenter", world, killed, config, "--resume") == 0
    assert not any(p.exists() for p in partials)
    full = load_bundle(tmp_path / "full.safetensors").tensors
    resumed = load_bundle(killed).tensors
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0, msg=key)


def test_a_checkpoint_is_never_overwritten_or_resumed_under_other_settings(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    config = write_config(tmp_path / "c.yaml", **TINY)
    out = tmp_path / "seg.safetensors"
    ckpt = Path(f"{out}.ckpt")
    assert train("segmenter", world, out, config, "--stop-after", "2") == 0
    capsys.readouterr()
    saved = ckpt.read_bytes()
    # The same command again without --resume would start over and overwrite the run.
    assert train("segmenter", world, out, config) == 2
    err = capsys.readouterr().err
    assert "holds a run at iteration 2" in err and "--resume" in err and "--restart" in err
    assert ckpt.read_bytes() == saved
    # Resuming under another learning rate or on other data would mix two runs.
    other_lr = write_config(tmp_path / "lr.yaml", **{**TINY, "lr": 0.5})
    assert train("segmenter", world, out, other_lr, "--resume") == 2
    assert "lr: " in capsys.readouterr().err
    shutil.copytree(world, tmp_path / "elsewhere")  # the same images, another dataset
    assert train("segmenter", tmp_path / "elsewhere", out, config, "--resume") == 2
    assert "was written with data=" in capsys.readouterr().err
    # Fewer iterations than the checkpoint reached: the bundle would lie about them.
    short = write_config(tmp_path / "short.yaml", **{**TINY, "iterations": 1})
    assert train("segmenter", world, out, short, "--resume") == 2
    assert "past this run's iterations 1" in capsys.readouterr().err
    assert ckpt.read_bytes() == saved
    # A changed run length is a resumable change; --restart starts over on purpose.
    longer = write_config(
        tmp_path / "longer.yaml", **{**TINY, "iterations": TINY["iterations"] + 1}
    )
    assert train("segmenter", world, out, longer, "--resume") == 0 and out.is_file()
    assert f"wrote {out}" in capsys.readouterr().out
    assert train("segmenter", world, out, config, "--restart") == 0


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "is not a readable training state"),  # truncated
        (b"", "is not a readable training state"),
        (b"garbage" * 10, "is not a readable training state"),
        ("foreign", "is not a training state written by segsafe"),
    ],
)
def test_an_unreadable_checkpoint_is_named_without_a_traceback(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content, words
):
    config = write_config(tmp_path / "c.yaml", **TINY)
    out = tmp_path / "seg.safetensors"
    ckpt = Path(f"{out}.ckpt")
    assert train("segmenter", world, out, config, "--stop-after", "1") == 0
    if content is None:
        ckpt.write_bytes(ckpt.read_bytes()[:-100])
    elif content == "foreign":
        torch.save({"weights": torch.zeros(2)}, ckpt)
    else:
        ckpt.write_bytes(content)
    capsys.readouterr()
    assert train("segmenter", world, out, config, "--resume") == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and words in err
    assert "Traceback" not in err and "weights_only` set to `False" not in err


def test_a_resumed_model_of_another_shape_is_named(world: Path, tmp_path: Path, capsys):
    out = tmp_path / "seg.safetensors"
    narrow = write_config(tmp_path / "c.yaml", **TINY)
    assert train("segmenter", world, out, narrow, "--stop-after", "1") == 0
    options = {**TINY["architecture_options"], "width": 2 * TINY["architecture_options"]["width"]}
    wide = write_config(tmp_path / "w.yaml", **{**TINY, "architecture_options": options})
    capsys.readouterr()
    assert train("segmenter", world, out, wide, "--resume") == 2
    assert "architecture_options" in capsys.readouterr().err  # named as a changed setting


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("iterations", -5, "'iterations' = -5: must be an integer >= 1"),
        ("iterations", 0, "must be an integer >= 1"),
        ("iterations", "many", "must be an integer >= 1"),
        ("checkpoint_every", 0, "'checkpoint_every' = 0"),
        ("log_every", 0, "'log_every' = 0"),
        ("batch_size", -2, "'batch_size' = -2"),
        ("lr", -0.1, "'lr' = -0.1: must be a number > 0"),
        ("crop_size", [0, 0], "'crop_size' = [0, 0]"),
    ],
)
def test_config_values_the_loop_cannot_run_with_are_named(
    world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], key, value, words
):
    bad = write_config(tmp_path / "bad.yaml", **{**TINY, key: value})
    assert train("segmenter", world, tmp_path / "x.safetensors", bad) == 2
    err = capsys.readouterr().err
    assert words in err and "bad.yaml" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("workers", -1, False),
        ("workers", 0, True),
        ("weight_decay", -1e-4, False),
        ("weight_decay", "0.1", False),
        ("weight_decay", 0.0, True),
        ("grad_clip", -1.0, False),
        ("grad_clip", True, False),
        ("grad_clip", None, True),
        ("lr", 0, False),
        ("lr", 1e-9, True),
        ("batch_size", True, False),
        ("batch_size", 2.0, False),
        ("crop_size", [64, 64.5], False),
        ("crop_size", None, True),
    ],
)
def test_check_values_refuses_what_the_loop_cannot_use(key, value, ok):
    from training.config import ConfigError, check_values

    config = {"iterations": 1, "batch_size": 1, "lr": 0.1, key: value}
    if ok:
        check_values(config, "c.yaml")
        return
    with pytest.raises(ConfigError, match=f"c.yaml: config key '{key}'"):
        check_values(config, "c.yaml")


def test_a_bad_out_or_stop_after_is_refused_before_training(world: Path, tmp_path: Path, capsys):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    cases = [
        (tmp_path / "a_dir", (), "is a directory"),
        (tmp_path / "a_file" / "x.safetensors", (), "is a file, not a directory"),
        (tmp_path / "ok.safetensors", ("--stop-after", "0"), "--stop-after must be >= 1"),
        (tmp_path / "ok.safetensors", ("--resume", "--restart"), "exclude each other"),
    ]
    for out, extra, words in cases:
        assert train("segmenter", world, out, None, *extra) == 2
        assert words in capsys.readouterr().err
    assert not Path(f"{tmp_path / 'a_dir'}.ckpt").exists()  # refused before any training


def test_flowenedet_keeps_the_seed_best_on_held_out_decoy_streets(
    world: Path, models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from training.world import write_world

    base = {k: v for k, v in TINY.items() if k != "architecture_options"}
    out = tmp_path / "flowenedet.safetensors"
    config = write_config(tmp_path / "fed.yaml", **{**base, "iterations": 2, "batch_size": 1},
                          segmenter=str(models / "segmenter.safetensors"), blocks=2, hidden=8,
                          select_seeds=[0, 1])  # fmt: skip
    assert train("flowenedet", world, out, config) == 0
    # The printout is in percent, the bundle in fractions: the unit must show.
    assert re.search(r"seed 1: .*: AP \d+\.\d\d%, FPR95 \d+\.\d\d%", capsys.readouterr().out)
    metrics = load_bundle(out, kind="flowenedet").metadata["metrics"]
    candidates = metrics["selected_from"]
    assert set(candidates) == {"0", "1"}
    assert metrics["decoy_ap"] == max(candidates.values())
    assert candidates[str(metrics["seed"])] == metrics["decoy_ap"]
    assert (tmp_path / "flowenedet.seed0.ckpt").is_file()
    assert (tmp_path / "flowenedet.seed1.ckpt").is_file()
    # Killed during the first seed's fit: --resume finishes it and fits the second afresh,
    # choosing as the uninterrupted run did.
    killed = tmp_path / "killed.safetensors"
    assert train("flowenedet", world, killed, config, "--stop-after", "1") == 0
    assert not (tmp_path / "killed.seed1.ckpt").exists()
    assert train("flowenedet", world, killed, config, "--resume") == 0
    assert load_bundle(killed).metadata["metrics"]["selected_from"] == candidates

    bare = tmp_path / "bare"  # no streets with decoys: nothing to choose by
    write_world(bare, seed=0, train=2, val=1, anomaly=0, sequences=0, height=H, width=W,
                negatives=0, progress=False)  # fmt: skip
    assert train("flowenedet", bare, tmp_path / "bare.safetensors", config) == 2
    assert "select_seeds chooses by the held-out streets" in capsys.readouterr().err
    one = write_config(tmp_path / "one.yaml", **{**base, "iterations": 2}, select_seeds=[3])
    assert train("flowenedet", world, tmp_path / "one.safetensors", one) == 2
    assert "two or more distinct seeds" in capsys.readouterr().err


def test_detector_trainers_write_loadable_bundles(world: Path, models: Path, tmp_path: Path):
    base = {k: v for k, v in TINY.items() if k != "architecture_options"}
    base["iterations"] = 2
    seg = str(models / "segmenter.safetensors")

    sml = write_config(tmp_path / "sml.yaml", device="cpu", segmenter=seg)
    assert train("sml", world, models / "sml.safetensors", sml) == 0

    dh_dir = tmp_path / "dh"
    dh = write_config(tmp_path / "dh.yaml", **base, segmenter=seg,
                      segmenter_out=str(dh_dir / "segmenter.safetensors"))  # fmt: skip
    assert train("densehybrid", world, dh_dir / "densehybrid.safetensors", dh) == 0
    meta = load_bundle(dh_dir / "densehybrid.safetensors", kind="densehybrid").metadata
    assert np.isfinite(meta["thresholds"]["open_set"])
    assert meta["calibration"].startswith("1 held-out streets with decoys")
    # Every part carries its segmenter's class names and normalisation (DESIGN §5.4).
    seg_meta = load_bundle(seg).metadata
    for part in (meta, load_bundle(models / "sml.safetensors").metadata):
        assert part["class_names"] == seg_meta["class_names"]
        assert (part["mean"], part["std"]) == (seg_meta["mean"], seg_meta["std"])

    flow = write_config(tmp_path / "flow.yaml", **{**base, "batch_size": 1}, segmenter=seg,
                        steps=2, hidden=8, combine="logreg")  # fmt: skip
    assert train("flow", world, models / "flow.safetensors", flow) == 0
    fed = write_config(tmp_path / "fed.yaml", **{**base, "batch_size": 1}, segmenter=seg,
                       blocks=2, hidden=8)  # fmt: skip
    assert train("flowenedet", world, models / "flowenedet.safetensors", fed) == 0

    image = np.zeros((H, W, 3), np.uint8)
    pipe = Pipeline.from_models_dir(models, PipelineConfig(anomaly="sml", device="cpu"))
    assert pipe.process(image).anomaly.shape == (H, W)
    pipe = Pipeline.from_models_dir(dh_dir, PipelineConfig(anomaly="densehybrid", device="cpu"))
    assert pipe.detectors["densehybrid"].thresholds["open_set"] == meta["thresholds"]["open_set"]
    assert pipe.process(image).anomaly.shape == (H, W)

    # Default options on purpose: load_part rebuilds each flow from its bundle's architecture.
    trained = {"flow_density": {"steps": 2, "hidden": 8, "combine": "logreg"},
               "flowenedet_u": {"blocks": 2, "hidden": 8}}  # fmt: skip
    for name, kind in (("flow_density", "flow"), ("flowenedet_u", "flowenedet")):
        meta = load_bundle(models / f"{kind}.safetensors", kind=kind).metadata
        assert meta["training"]["config"]["hidden"] == 8 and len(meta["class_names"]) == 19
        assert "metrics" in meta
        if kind == "flowenedet":  # measured on the held-out street with decoys
            assert meta["metrics"]["decoy_images"] == 1
            assert 0.0 <= meta["metrics"]["decoy_ap"] <= 1.0
        pipe = Pipeline.from_models_dir(models, PipelineConfig(anomaly=name, device="cpu"))
        arch = pipe.detectors[name].architecture
        assert {k: arch[k] for k in trained[name]} == trained[name]
        assert pipe.process(image).anomaly.shape == (H, W)
    # FED-C has its own bundle kind and file, so a FED-U directory lacks it by name.
    with pytest.raises(BundleError, match="flowenedet_c.safetensors: file not found"):
        Pipeline.from_models_dir(models, PipelineConfig(anomaly="flowenedet_c", device="cpu"))


def test_densehybrid_in_a_models_dir_names_the_fine_tuned_segmenter(
    world: Path, models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # The default layout: the base segmenter is the models directory's segmenter and the
    # fine-tuned one goes beside the head, so the directory does not load DenseHybrid as
    # it is. The trainer and the refusal must both say which file to use instead.
    md = tmp_path / "md"
    md.mkdir()
    shutil.copy(models / "segmenter.safetensors", md / "segmenter.safetensors")
    base = {k: v for k, v in TINY.items() if k != "architecture_options"}
    config = write_config(tmp_path / "dh.yaml", **{**base, "iterations": 2})
    assert train("densehybrid", world, md / "densehybrid.safetensors", config) == 0
    fine_tuned, segmenter = md / "densehybrid_segmenter.safetensors", md / "segmenter.safetensors"
    out = capsys.readouterr().out
    assert f"fine-tuned segmenter {fine_tuned}: use it as {segmenter}" in out
    meta = load_bundle(md / "densehybrid.safetensors", kind="densehybrid").metadata
    assert meta["segmenter"]["name"] == str(fine_tuned)  # not the base it started from
    assert meta["segmenter_bundle"] == fine_tuned.name  # relative to the head's bundle

    dh = PipelineConfig(anomaly="densehybrid", device="cpu")
    with pytest.raises(BundleError) as refused:
        Pipeline.from_models_dir(md, dh)
    message = str(refused.value)
    assert f"trained with the fine-tuned segmenter {fine_tuned} (sha256:" in message
    assert f"base segmenter it was fine-tuned from, {segmenter} (sha256:" in message
    assert f"use {fine_tuned} as {segmenter}" in message
    # Doing what it says makes the directory load.
    segmenter.rename(md / "segmenter_base.safetensors")
    fine_tuned.rename(segmenter)
    pipe = Pipeline.from_models_dir(md, dh)
    assert pipe.process(np.zeros((H, W, 3), np.uint8)).anomaly.shape == (H, W)


def test_ctrl_c_says_where_the_progress_is(world: Path, tmp_path: Path, monkeypatch, capsys):
    from segmentation_safety.cli import main as segsafe
    from training import train_segmenter

    def interrupted(config, args):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(train_segmenter, "train", interrupted)
    out = tmp_path / "seg.safetensors"
    argv = ["train", "segmenter", "--data", str(world), "--out", str(out)]
    assert segsafe(argv) == 130
    assert "no checkpoint was written yet" in capsys.readouterr().err
    Path(f"{out}.ckpt").write_bytes(b"x")
    assert segsafe([*argv, "--resume"]) == 130
    assert f"--resume to continue from {out}.ckpt" in capsys.readouterr().err


def test_bad_config_key_and_data_dir_are_named(world: Path, tmp_path: Path, capsys):
    bad = write_config(tmp_path / "bad.yaml", lr_rate=0.1)
    assert train("segmenter", world, tmp_path / "x.safetensors", bad) == 2
    assert "lr_rate" in capsys.readouterr().err
    missing = tmp_path / "no_such_world"
    assert train("segmenter", missing, tmp_path / "x.safetensors") == 2
    assert str(missing) in capsys.readouterr().err


def test_missing_trainer_module_is_reported(monkeypatch, capsys):
    import importlib

    real = importlib.import_module

    def fake(name: str, *args):
        if name == "training.train_generator":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    assert cli.main(["generator", "--data", "x", "--out", "y"]) == 2
    assert "training.train_generator" in capsys.readouterr().err


def test_sample_stream_shards_the_global_batch():
    stream = engine.SampleStream(size=5, batch_size=1, seed=3)
    one = engine.SampleStream(size=5, batch_size=2, seed=3)
    for it in range(6):  # crosses an epoch boundary
        two_procs = [stream.index(p) for r in range(2) for p in stream.positions(it, r, 2)]
        assert two_procs == [one.index(p) for p in one.positions(it)]


@pytest.mark.slow
def test_ddp_two_processes_match_one(world: Path, tmp_path: Path):
    """2 gloo processes × batch 1 give the weights of 1 process × batch 2.

    BatchNorm is ``frozen`` (per-rank batch statistics would differ from the 2-image
    batch; SyncBatchNorm needs CUDA), dropout and augmentation are off, and void labels
    are replaced, so each rank's mean loss averages to the single process' mean.
    """
    import cv2

    data = tmp_path / "world"
    subprocess.run(["cp", "-r", str(world), str(data)], check=True)
    for path in (data / "gtFine").rglob("*_labelTrainIds.png"):
        label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        label[label == 255] = 0
        cv2.imwrite(str(path), label)
    common = {**TINY, "architecture_options": {"width": 4, "dropout": 0.0}, "bn": "frozen",
              "scale_range": [1.0, 1.0], "flip": 0.0, "iterations": 3, "lr": 0.05}  # fmt: skip
    one = write_config(tmp_path / "one.yaml", **common)
    two = write_config(tmp_path / "two.yaml", **{**common, "batch_size": 1})
    assert train("segmenter", data, tmp_path / "one.safetensors", one) == 0

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "training.cli",
           "segmenter", "--data", str(data), "--out", str(tmp_path / "two.safetensors"),
           "--config", str(two)]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    a = load_bundle(tmp_path / "one.safetensors").tensors
    b = load_bundle(tmp_path / "two.safetensors").tensors
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)


# -- opening and closing a run ------------------------------------------------------------
def test_every_trainer_opens_its_run_with_the_context_manager():
    # init_run without open_run is how six trainers once skipped close_run on early stop.
    for path in sorted((REPO / "training").glob("train_*.py")):
        source = path.read_text()
        assert "engine.open_run(" in source, path.name
        assert "init_run(" not in source and "close_run(" not in source, path.name


def test_a_run_stopped_early_is_closed(world: Path, tmp_path: Path, monkeypatch):
    closed = []
    monkeypatch.setattr(engine.loop, "close_run", lambda ctx: closed.append(ctx))
    config = write_config(tmp_path / "c.yaml", **TINY)
    out = tmp_path / "stopped.safetensors"
    assert train("segmenter", world, out, config, "--stop-after", "1") == 0
    assert not out.exists() and len(closed) == 1


class _FakeGroup:
    """torch.distributed as a run of two ranks sees it, recording what is called."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.up = True

    def is_initialized(self) -> bool:
        return self.up

    def barrier(self) -> None:
        self.calls.append("barrier")

    def destroy_process_group(self) -> None:
        self.calls.append("destroy")
        self.up = False


@pytest.mark.parametrize("ending", ["return", "raise"])
def test_the_process_group_is_destroyed_however_the_run_ends(monkeypatch, ending: str):
    group = _FakeGroup()
    monkeypatch.setattr(engine.loop, "dist", group)
    two_ranks = engine.RunContext(torch.device("cpu"), 0, rank=0, world_size=2)
    monkeypatch.setattr(engine.loop, "init_run", lambda *a, **k: two_ranks)

    def trainer() -> str:
        with engine.open_run("cpu", 0, False) as ctx:
            assert ctx is two_ranks
            if ending == "raise":
                raise RuntimeError("a bug in the trainer")
            return "stopped"

    if ending == "raise":
        with pytest.raises(RuntimeError, match="a bug"):
            trainer()
        # No barrier after a failure: the other rank may never reach it.
        assert group.calls == ["destroy"]
    else:
        assert trainer() == "stopped"
        assert group.calls == ["barrier", "destroy"]


def test_training_without_tensorboard_logs_nothing_and_says_so(
    world: Path, tmp_path: Path, monkeypatch, capsys
):
    # A plain `pip install -e .` has no tensorboard (it comes with the train extra).
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    config = write_config(tmp_path / "c.yaml", **{**TINY, "iterations": 2})
    out = tmp_path / "plain.safetensors"
    assert train("segmenter", world, out, config) == 0
    assert out.is_file() and not engine.log_dir(out).exists()
    notes = [line for line in capsys.readouterr().err.splitlines() if "TensorBoard" in line]
    assert len(notes) == 1 and notes[0].startswith("note: no TensorBoard logging")


def test_an_existing_bundle_is_trained_over_only_with_restart(world: Path, tmp_path: Path, capsys):
    out = tmp_path / "trained.safetensors"
    out.write_bytes(b"hours of training")
    assert train("segmenter", world, out) == 2
    assert "exists (a trained bundle): pass --restart" in capsys.readouterr().err
    assert out.read_bytes() == b"hours of training"


def test_a_resume_under_another_segmenter_or_other_negatives_is_refused(
    world: Path, models: Path, tmp_path: Path, capsys
):
    import shutil

    base = {k: v for k, v in TINY.items() if k != "architecture_options"}
    seg = tmp_path / "segmenter.safetensors"
    shutil.copy(models / "segmenter.safetensors", seg)
    flow = write_config(tmp_path / "flow.yaml", **{**base, "batch_size": 1, "iterations": 3},
                        segmenter=str(seg), steps=2, hidden=8)  # fmt: skip
    out = tmp_path / "flow.safetensors"
    assert train("flow", world, out, flow, "--stop-after", "1") == 0
    # The segmenter file changes between the stop and the resume (fine-tuned since, say).
    from segmentation_safety.models.zoo import segmenter_fingerprint, segmenter_from_bundle

    bundle = load_bundle(seg)
    tensors = {k: v + 0.01 if v.is_floating_point() else v for k, v in bundle.tensors.items()}
    changed = Bundle(tensors=tensors, metadata=bundle.metadata)
    fingerprint = segmenter_fingerprint(segmenter_from_bundle(changed))  # as a trainer records
    save_bundle(seg, tensors, {**bundle.metadata, "fingerprint": fingerprint})
    assert train("flow", world, out, flow, "--resume") == 2
    assert "was written with segmenter='sha256:" in capsys.readouterr().err
    # DenseHybrid's negatives are part of its run too, the default folder included.
    shutil.copytree(world / "negatives", tmp_path / "other_negatives")
    dh = write_config(tmp_path / "dh.yaml", **{**base, "iterations": 3},
                      segmenter=str(models / "segmenter.safetensors"),
                      segmenter_out=str(tmp_path / "dh_segmenter.safetensors"))  # fmt: skip
    dh_out = tmp_path / "densehybrid.safetensors"
    assert train("densehybrid", world, dh_out, dh, "--stop-after", "1") == 0
    other = str(tmp_path / "other_negatives")
    assert train("densehybrid", world, dh_out, dh, "--resume", "--negatives", other) == 2
    assert "was written with negatives=" in capsys.readouterr().err


def test_a_checkpoint_written_without_amp_resumes_with_it(tmp_path: Path):
    # device may change on resume: a CPU run (no AMP) continued on CUDA with amp: true.
    from training.engine.loop import Trainable, load_training_state, save_training_state

    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    trainable = Trainable(
        module, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    )
    path = tmp_path / "run.ckpt"
    save_training_state(path, trainable, torch.amp.GradScaler("cpu", enabled=False), 3, {})
    enabled = torch.amp.GradScaler("cpu", enabled=True)
    assert load_training_state(path, trainable, enabled, {}) == 3  # raised before
    assert enabled.is_enabled()


def test_a_resume_on_a_dataset_remade_at_the_same_path_is_refused(
    world: Path, tmp_path: Path, capsys
):
    import shutil

    data = tmp_path / "world"
    shutil.copytree(world, data)
    config = write_config(tmp_path / "seg.yaml", **{**TINY, "iterations": 3})
    out = tmp_path / "seg.safetensors"
    assert train("segmenter", data, out, config, "--stop-after", "1") == 0
    images = sorted((data / "leftImg8bit" / "train").rglob("*_leftImg8bit.png"))
    labels = sorted((data / "gtFine" / "train").rglob("*_gtFine_labelTrainIds.png"))
    extra = images[0].name.replace("_leftImg8bit", "x_leftImg8bit")
    shutil.copy(images[0], images[0].with_name(extra))  # one more training frame
    for suffix in ("labelTrainIds", "labelIds"):
        src = labels[0].with_name(labels[0].name.replace("labelTrainIds", suffix))
        if src.exists():
            shutil.copy(src, src.with_name(src.name.replace("_gtFine", "x_gtFine")))
    assert train("segmenter", data, out, config, "--resume") == 2
    assert "data_items=" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["densehybrid", "flow"])
def test_a_model_without_its_segmenter_says_where_it_looked_and_how_to_make_one(
    model: str, world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    config = write_config(tmp_path / "c.yaml", device="cpu", iterations=1)
    assert train(model, world, tmp_path / "models" / f"{model}.safetensors", config) == 2
    err = capsys.readouterr().err
    assert f"no segmenter bundle at {tmp_path / 'models' / 'segmenter.safetensors'}" in err, err
    assert "beside --out" in err and "segsafe train segmenter" in err and "Traceback" not in err


def test_flow_and_densehybrid_train_on_real_layout_data_with_negatives_given(
    world: Path, models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # Cityscapes-layout data has no negatives/ folder and no streets with decoys: flow's
    # logreg failed after all its training, ignoring --negatives, and DenseHybrid's
    # default refused to run at all (the paper's own setting: real data + ADE20k).
    city = tmp_path / "city"
    for part in ("leftImg8bit", "gtFine"):
        shutil.copytree(world / part, city / part)
    base = {k: v for k, v in TINY.items() if k != "architecture_options"}
    seg = str(models / "segmenter.safetensors")
    flow = write_config(tmp_path / "flow.yaml", **{**base, "iterations": 1}, segmenter=seg,
                        combine="logreg", steps=2, hidden=8)  # fmt: skip
    out = tmp_path / "m" / "flow.safetensors"
    assert train("flow", city, out, flow) == 2
    assert "--negatives DIR" in capsys.readouterr().err
    assert not Path(f"{out}.ckpt").exists()  # refused before any training
    negatives = ["--negatives", str(world / "negatives")]
    assert train("flow", city, out, flow, *negatives) == 0
    dh = write_config(tmp_path / "dh.yaml", **{**base, "iterations": 1}, segmenter=seg,
                      segmenter_out=str(tmp_path / "m" / "dh_seg.safetensors"))  # fmt: skip
    assert train("densehybrid", city, tmp_path / "m" / "dh.safetensors", dh, *negatives) == 0
    assert "training on pasted negatives only" in capsys.readouterr().err
