"""`segsafe import-weights` on the checkpoints people actually have.

EdgeNets' ESPNetv2 files other than the Cityscapes 1024x512 ones, training checkpoints
as trainers save them, files that are no checkpoint at all, and the options. Everything
runs on small synthetic checkpoints written to tmp_path (ESPNetv2 at s = 0.5); the real
files are only checked where ../shared/real has them.
"""

from __future__ import annotations

import argparse
import functools
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from segmentation_safety.checkpoint import load_bundle
from segmentation_safety.commands import import_weights
from segmentation_safety.labels import TRAIN_NAMES
from segmentation_safety.models.importers import (
    VOC_NAMES,
    ImportWeightsError,
    import_checkpoint,
    read_state_dict,
)
from segmentation_safety.models.zoo import build_segmenter, segmenter_fingerprint
from segmentation_safety.pipeline import Pipeline, PipelineConfig


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    import_weights.add_parser(parser.add_subparsers())
    args = parser.parse_args(["import-weights", *argv])
    return args.run(args)


@functools.cache
def _espnetv2_state(channels: int) -> dict[str, torch.Tensor]:
    """An ESPNetv2 (s = 0.5) state dict with ``channels`` outputs, as EdgeNets saves them."""
    torch.manual_seed(channels)
    model = build_segmenter("espnetv2", scale=0.5, num_classes=channels, extra_channels=0)
    return dict(model.net.state_dict())


def _save_espnetv2(path: Path, channels: int = 20) -> Path:
    torch.save(_espnetv2_state(channels), path)
    return path


def _names_file(path: Path, names: list[str]) -> Path:
    path.write_text("\n".join(names) + "\n")
    return path


# -- ESPNetv2: classes and input size from the file -------------------------------------
def test_an_espnetv2_pascal_checkpoint_keeps_its_21_voc_classes_and_its_size(tmp_path, capsys):
    ckpt = _save_espnetv2(tmp_path / "espnetv2_s_0.5_pascal_384x384.pth", channels=21)
    got = import_checkpoint(ckpt)
    assert got.model.num_classes == 21 and got.model.extra_channels == 0
    assert got.class_names == list(VOC_NAMES) and got.input_size == [384, 384]
    assert "Pascal VOC" in got.description and "Cityscapes" not in got.description
    # A file of the 21 VOC names is what the checkpoint holds, so it is accepted.
    names = _names_file(tmp_path / "voc.txt", list(VOC_NAMES))
    assert _cli(str(ckpt), "--class-names", str(names), "--out", str(tmp_path / "out")) == 0
    printed = capsys.readouterr().out
    assert "21 classes, input 384x384" in printed and "Cityscapes" not in printed
    meta = load_bundle(tmp_path / "out" / "segmenter.safetensors").metadata
    assert meta["class_names"][19:] == ["train", "tvmonitor"] and meta["input_size"] == [384, 384]


def test_an_espnetv2_cityscapes_checkpoint_drops_the_background_and_reads_its_size(tmp_path):
    # EdgeNets names its files by the training size, width x height.
    city = import_checkpoint(_save_espnetv2(tmp_path / "espnetv2_s_0.5_city_512x256.pth", 20))
    assert city.class_names == list(TRAIN_NAMES) and city.model.extra_channels == 1
    assert city.input_size == [256, 512] and "Cityscapes" in city.description
    assert "upstream's background class" in " ".join(city.notes)
    plain = import_checkpoint(_save_espnetv2(tmp_path / "espnetv2_19_1024x512.pth", 19))
    assert plain.class_names == list(TRAIN_NAMES) and plain.model.extra_channels == 0
    assert plain.input_size == [512, 1024] and not plain.notes
    # --input-size wins over the name.
    given = import_checkpoint(tmp_path / "espnetv2_19_1024x512.pth", input_size=(64, 128))
    assert given.input_size == [64, 128]


def test_an_espnetv2_size_the_name_does_not_give_is_assumed_with_a_note(tmp_path, capsys):
    ckpt = _save_espnetv2(tmp_path / "my_espnet.pth", 20)
    assert import_checkpoint(ckpt).input_size == [512, 1024]
    assert _cli(str(ckpt), "--out", str(tmp_path / "out")) == 0
    printed = capsys.readouterr().out
    assert "note: input 512x1024 (H x W) assumed" in printed and "--input-size H W" in printed
    # A size no node accepts in the name is not taken from it either.
    huge = _save_espnetv2(tmp_path / "espnetv2_city_100000x100000.pth", 20)
    assert import_checkpoint(huge).input_size == [512, 1024]


def test_espnetv2_class_names_set_the_count_within_the_output_channels(tmp_path):
    seven = _save_espnetv2(tmp_path / "seven.pth", 7)
    got = import_checkpoint(seven)
    assert got.class_names == [str(i) for i in range(7)] and "(7 classes)" in got.description
    names = [f"c{i}" for i in range(7)]
    assert import_checkpoint(seven, class_names=names).class_names == names
    with pytest.raises(ImportWeightsError) as err:
        import_checkpoint(seven, class_names=names[:6])
    assert "6 class names given, seven.pth has 7 output channels: give 7 names" in str(err.value)
    # 20 channels: the 19 classes without upstream's background, or all 20 named.
    city = _save_espnetv2(tmp_path / "city.pth", 20)
    all20 = import_checkpoint(city, class_names=[*TRAIN_NAMES, "background"])
    assert all20.model.num_classes == 20 and all20.model.extra_channels == 0
    assert "Cityscapes" not in all20.description
    own19 = import_checkpoint(city, class_names=[f"k{i}" for i in range(19)])
    assert own19.model.num_classes == 19 and own19.model.extra_channels == 1
    with pytest.raises(ImportWeightsError) as err:
        import_checkpoint(city, class_names=[f"k{i}" for i in range(18)])
    text = str(err.value)
    assert "18 class names given, city.pth has 20 output channels: give 19 " in text
    assert "background channel) or 20 names" in text


# -- files that are no checkpoint --------------------------------------------------------
def test_any_file_that_is_not_a_checkpoint_is_refused_by_name(tmp_path, recwarn):
    # Files starting with ( . N Q R h j ... made the weights-only unpickler raise KeyError
    # or IndexError, which escaped as a traceback: every first byte, two kinds of tail.
    path = tmp_path / "bad.pth"
    for tail in (b"ello, world\n", b"\x00\x01\x02\xff" * 4):
        for first in range(256):
            path.write_bytes(bytes([first]) + tail)
            with pytest.raises(ImportWeightsError) as err:
                read_state_dict(path)
            text = str(err.value)
            assert text.startswith(f"{path}: not a readable PyTorch checkpoint ("), first
            assert "weights_only" not in text, first
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]
    path.write_bytes(b"")
    with pytest.raises(ImportWeightsError, match="bad.pth: empty file"):
        read_state_dict(path)


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")  # only to write the file
def test_torchs_advice_to_load_unsafely_is_never_passed_on(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(ImportWeightsError) as err:
        read_state_dict(tmp_path / "module.pth")
    text = str(err.value)
    assert "module.pth: not a weights-only" in text and "torch.nn.modules.linear.Linear" in text
    assert "weights_only" not in text and "arbitrary code" not in text
    with tarfile.open(tmp_path / "old.pth", "w") as tar:  # PyTorch's pre-2017 format
        info = tarfile.TarInfo("storages")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ImportWeightsError) as err:
        read_state_dict(tmp_path / "old.pth")
    assert "legacy .tar format" in str(err.value) and "weights_only" not in str(err.value)
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with pytest.raises(ImportWeightsError, match="scripted.pt: a TorchScript archive"):
        read_state_dict(tmp_path / "scripted.pt")


# -- training checkpoints ------------------------------------------------------------------
def test_training_checkpoints_import_as_their_weights(tmp_path):
    state = _espnetv2_state(20)
    raw = import_checkpoint(_save_espnetv2(tmp_path / "raw.pth", 20))
    layouts = {
        # torchvision's references/segmentation/train.py saves its argparse Namespace.
        "tv_reference": {
            "model": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.02}]},
            "lr_scheduler": {"last_epoch": 3},
            "epoch": 3,
            "args": argparse.Namespace(lr=0.02, dataset="coco", aux_loss=True, crop=[480, 480]),
        },
        "np_scalar": {"state_dict": state, "best_miou": np.float64(0.61), "step": np.int64(9)},
        "config_first": {"model": {"arch": "espnetv2", "s": 0.5}, "state_dict": state},
        "lightning": {
            "state_dict": {f"model.{k}": v for k, v in state.items()},
            "pytorch-lightning_version": "2.4.0",
        },
        "lightning_net": {"state_dict": {f"net.{k}": v for k, v in state.items()}},
        "lightning_ddp": {"state_dict": {f"model.module.{k}": v for k, v in state.items()}},
        "swa": {**{f"module.{k}": v for k, v in state.items()}, "n_averaged": torch.tensor(5)},
    }
    for name, content in layouts.items():
        torch.save(content, tmp_path / f"{name}.pth")
        got = import_checkpoint(tmp_path / f"{name}.pth")
        assert segmenter_fingerprint(got.model) == segmenter_fingerprint(raw.model), name


def test_the_harmless_globals_are_allowed_for_one_load_only(tmp_path):
    torch.save({"model": _espnetv2_state(20), "args": argparse.Namespace(lr=1)}, tmp_path / "a.pth")
    # A set: torch keeps them in one, and other libraries may have added their own.
    before = set(torch.serialization.get_safe_globals())
    read_state_dict(tmp_path / "a.pth")
    assert set(torch.serialization.get_safe_globals()) == before
    # A global the caller allowed itself is still allowed afterwards.
    with torch.serialization.safe_globals([argparse.Namespace]):
        read_state_dict(tmp_path / "a.pth")
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    # Beyond them, the weights-only rules hold: a pathlib object is refused.
    torch.save({"model": _espnetv2_state(20), "root": Path("/data")}, tmp_path / "p.pth")
    with pytest.raises(ImportWeightsError, match="p.pth: not a weights-only .* pathlib"):
        read_state_dict(tmp_path / "p.pth")


def test_an_unrecognised_checkpoint_is_named_with_its_first_keys(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, tmp_path / "cls.pth")
    with pytest.raises(ImportWeightsError) as err:
        import_checkpoint(tmp_path / "cls.pth")
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'cls.pth'}: unrecognised checkpoint")
    assert "2 tensors: fc.weight, fc.bias" in text
    torch.save({"n_averaged": torch.tensor(1)}, tmp_path / "counter.pth")
    with pytest.raises(ImportWeightsError, match="counter.pth: unrecognised .* 0 tensors"):
        import_checkpoint(tmp_path / "counter.pth")


# -- torchvision ---------------------------------------------------------------------------
def test_a_torchvision_bundle_records_an_input_size_the_node_and_calibrate_use(tmp_path, capsys):
    model = build_segmenter("lraspp_mobilenet_v3", num_classes=21)
    torch.save(model.net.state_dict(), tmp_path / "lraspp.pth")
    assert _cli(str(tmp_path / "lraspp.pth"), "--out", str(tmp_path / "m")) == 0
    printed = capsys.readouterr().out
    assert "input 520x928 (H x W)" in printed and "note: input 520x928 (H x W) assumed" in printed
    assert "--input-size H W (4:3: 520 704)" in printed
    meta = load_bundle(tmp_path / "m" / "segmenter.safetensors").metadata
    assert meta["input_size"] == [520, 928] and "short side to 520" in meta["resize"]
    # The node and calibrate build their pipeline from the folder: the network's size.
    pipeline = Pipeline.from_models_dir(tmp_path / "m", PipelineConfig(anomaly="energy"))
    assert pipeline.config.input_size == (520, 928)
    # Given explicitly, the size is taken without the note.
    size = ("--input-size", "360", "640")
    rc = _cli(str(tmp_path / "lraspp.pth"), "--out", str(tmp_path / "n"), *size)
    assert rc == 0 and "assumed" not in capsys.readouterr().out


def test_the_input_size_help_says_what_the_defaults_are():
    parser = argparse.ArgumentParser()
    import_weights.add_parser(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["import-weights"]
    text = " ".join(sub.format_help().split())
    assert "520 928" in text and "_<W>x<H>" in text and "the publisher's" not in text


def test_other_torchvision_fcn_and_deeplab_models_are_named_as_what_they_are(tmp_path):
    head = {"classifier.4.weight": torch.zeros(21, 256, 1, 1)}
    aspp = {"classifier.0.convs.0.0.weight": torch.zeros(256, 2048, 1, 1)}
    fcn = {"classifier.0.weight": torch.zeros(512, 2048, 3, 3)}
    r101 = {"backbone.layer3.22.conv1.weight": torch.zeros(256, 1024, 1, 1)}
    mbv3 = {"backbone.0.0.weight": torch.zeros(16, 3, 3, 3)}
    for name, state in {
        "fcn_resnet50": {**head, **fcn},
        "deeplabv3_resnet101": {**head, **aspp, **r101},
        "fcn_resnet101": {**head, **fcn, **r101},
        "deeplabv3_mobilenet_v3_large": {**head, **aspp, **mbv3},
    }.items():
        torch.save(state, tmp_path / f"{name}.pth")
        with pytest.raises(ImportWeightsError) as err:
            import_checkpoint(tmp_path / f"{name}.pth")
        text = str(err.value)
        assert f"holds torchvision's {name}; of its FCN/DeepLab-style models only " in text
        assert "only deeplabv3_resnet50 (ResNet-50 backbone) is supported" in text


def test_weights_that_do_not_load_list_the_keys_that_differ(tmp_path):
    state = dict(_espnetv2_state(20))
    state.pop("bu_dec_l4.merge_layer.3.weight")
    state["head.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "city.pth")
    # Without its classifier the channel count is unknown: said so by name.
    with pytest.raises(ImportWeightsError, match="without the classifier"):
        import_checkpoint(tmp_path / "city.pth")
    state = dict(_espnetv2_state(20))
    state.pop("base_net.level1.bn.weight")
    state["head.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "city.pth")
    with pytest.raises(ImportWeightsError) as err:
        import_checkpoint(tmp_path / "city.pth")
    text = str(err.value)
    missing = "keys 1 missing (base_net.level1.bn.weight)"
    assert f"city.pth: ESPNetv2 s=0.5 weights do not load: {missing}" in text
    assert "1 unexpected (head.extra.weight)" in text
    model = build_segmenter("lraspp_mobilenet_v3", num_classes=21)
    state = dict(model.net.state_dict())
    state["classifier.cbr.0.weight"] = state["classifier.cbr.0.weight"][:64]
    torch.save(state, tmp_path / "lraspp.pth")
    with pytest.raises(ImportWeightsError) as err:
        import_checkpoint(tmp_path / "lraspp.pth")
    text = str(err.value)
    assert "lraspp.pth: lraspp_mobilenet_v3 weights do not load: size mismatch for " in text
    assert "classifier.cbr.0.weight" in text


# -- options -------------------------------------------------------------------------------
def test_out_naming_another_file_is_refused_before_any_work(tmp_path, capsys):
    ckpt = _save_espnetv2(tmp_path / "espnetv2_s_0.5_city_1024x512.pth", 20)
    rc = _cli(str(ckpt), "--out", str(tmp_path / "stp" / "espnet_s05.safetensors"))
    err = capsys.readouterr().err
    assert rc == 2 and "give a folder" in err and f"--out {tmp_path / 'stp' / 'espnet_s05'}" in err
    assert not (tmp_path / "stp").exists()
    # The one file name calibrate and the node read is the folder it sits in.
    rc = _cli(str(ckpt), "--out", str(tmp_path / "stp" / "segmenter.safetensors"))
    printed = capsys.readouterr().out
    assert rc == 0 and f"next: segsafe calibrate --models {tmp_path / 'stp'} " in printed
    assert (tmp_path / "stp" / "segmenter.safetensors").is_file()


def test_input_size_is_held_to_the_nodes_range(tmp_path, capsys):
    ckpt = _save_espnetv2(tmp_path / "espnetv2_s_0.5_city_1024x512.pth", 20)
    for size in (("100000", "100000"), ("7", "512"), ("512", "8193")):
        assert _cli(str(ckpt), "--input-size", *size, "--out", str(tmp_path / "o")) == 2
        assert "within 8..8192" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ImportWeightsError, match="within 8..8192"):
        import_checkpoint(ckpt, input_size=(100000, 100000))
    assert _cli(str(ckpt), "--input-size", "8192", "8", "--out", str(tmp_path / "o")) == 0


def test_class_names_files_with_blank_or_repeated_lines_are_refused_by_line(tmp_path, capsys):
    ckpt = _save_espnetv2(tmp_path / "espnetv2_s_0.5_pascal_384x384.pth", 21)
    out = str(tmp_path / "o")
    blank = list(VOC_NAMES)
    blank[11] = ""
    _names_file(tmp_path / "blank.txt", blank)
    assert _cli(str(ckpt), "--class-names", str(tmp_path / "blank.txt"), "--out", out) == 2
    assert "blank.txt: line 12 is blank" in capsys.readouterr().err
    repeated = list(VOC_NAMES)
    repeated[4] = "aeroplane"
    _names_file(tmp_path / "dup.txt", repeated)
    assert _cli(str(ckpt), "--class-names", str(tmp_path / "dup.txt"), "--out", out) == 2
    assert "dup.txt: line 5 repeats 'aeroplane' from line 2" in capsys.readouterr().err
    # Blank lines after the last name shift nothing: accepted.
    (tmp_path / "end.txt").write_text("\n".join(VOC_NAMES) + "\n\n\n")
    assert _cli(str(ckpt), "--class-names", str(tmp_path / "end.txt"), "--out", out) == 0


def test_a_wrong_arch_is_named_with_its_article(tmp_path):
    ckpt = _save_espnetv2(tmp_path / "e.pth", 20)
    with pytest.raises(ImportWeightsError, match="holds an espnetv2 checkpoint, not lraspp"):
        import_checkpoint(ckpt, architecture="lraspp_mobilenet_v3")


# -- the real files import as before -------------------------------------------------------
@pytest.mark.real
@pytest.mark.parametrize(
    ("scale", "fingerprint"),
    [("2.0", "sha256:7831827631fdb66c"), ("1.0", "sha256:11986a3662e25975")],
)
def test_the_real_espnetv2_files_import_as_before(real_data, scale, fingerprint):
    path = real_data / f"espnetv2/espnetv2_s_{scale}_city_1024x512.pth"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    got = import_checkpoint(path)
    assert segmenter_fingerprint(got.model) == fingerprint
    assert got.class_names == list(TRAIN_NAMES) and got.input_size == [512, 1024]
    assert got.description == f"ESPNetv2 s={scale} Cityscapes, imported from {path.name}"
