"""SynthCP trainers end to end: generator and comparison bundles load into the pipeline.

A tiny world (32×64 images), tiny presets and 2-4 iterations: the file checks plumbing,
resume and bundle contracts, not learning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from segmentation_safety.checkpoint import load_bundle
from segmentation_safety.pipeline import Pipeline, PipelineConfig
from training import cli

H, W = 32, 64
COMMON = {"device": "cpu", "workers": 0, "checkpoint_every": 1, "log_every": 1}
SEGMENTER = {
    **COMMON,
    "architecture_options": {"width": 4, "dropout": 0.1},
    "iterations": 2,
    "batch_size": 2,
    "crop_size": [H, W],
}
# Smaller than the tiny preset still: the bundles carry their architecture, so the
# detector rebuilds whatever was trained.
GENERATOR = {
    **COMMON,
    "generator_options": {"ngf": 4, "hidden": 8, "num_upsampling": 2},
    "discriminator_options": {"ndf": 8, "n_layers": 2, "num_d": 1},
    "iterations": 2,
    "batch_size": 2,
    "eval_max_images": 1,
}
COMPARISON = {
    **COMMON,
    "iterations": 2,
    "batch_size": 2,
    "eval_max_images": 2,
    "comparison_options": {"width": 4, "fuse_channels": 4},
    "fold_segmenter_options": {"iterations": 2, "batch_size": 2, "workers": 0},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.world import write_world

    root = tmp_path_factory.mktemp("world")
    write_world(root, seed=0, train=4, val=2, anomaly=1, sequences=0, height=H, width=W,
                negatives=1, progress=False)  # fmt: skip
    return root


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def train(model: str, data: Path, out: Path, config: Path, *extra: str) -> int:
    return cli.main(
        [model, "--data", str(data), "--out", str(out), "--config", str(config), *extra]
    )


@pytest.fixture(scope="module")
def models(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with a tiny segmenter and a tiny generator."""
    root = tmp_path_factory.mktemp("models")
    cfg = tmp_path_factory.mktemp("configs")
    seg = write_config(cfg / "segmenter.yaml", SEGMENTER)
    assert train("segmenter", world, root / "segmenter.safetensors", seg) == 0
    gen = write_config(cfg / "generator.yaml", GENERATOR)
    assert train("generator", world, root / "generator.safetensors", gen) == 0
    return root


def resynthesis_pipeline(models_dir: Path) -> Pipeline:
    config = PipelineConfig(
        anomaly="resynthesis",
        failure="resynthesis",
        class_iou="resynthesis",
        device="cpu",
        detector_options={"resynthesis": {"preset": "tiny"}},
    )
    return Pipeline.from_models_dir(models_dir, config)


def test_generator_bundle(models: Path):
    bundle = load_bundle(models / "generator.safetensors", kind="generator")
    meta = bundle.metadata
    assert meta["architecture"]["name"] == "spade"
    assert meta["architecture"]["num_classes"] == 19
    assert meta["input_size"] == [H, W]
    assert 0.0 <= meta["metrics"]["val_l1"] <= 1.0
    assert meta["training"]["config"]["iterations"] == GENERATOR["iterations"]
    # Only the generator ships: no discriminator weights in the bundle.
    assert not any(k.startswith("discriminator") for k in bundle.tensors)


def test_generator_resume_matches_uninterrupted(world: Path, models: Path, tmp_path: Path):
    config = write_config(tmp_path / "generator.yaml", GENERATOR)
    out = tmp_path / "generator.safetensors"
    assert train("generator", world, out, config, "--stop-after", "1") == 0
    assert not out.exists() and (tmp_path / "generator.safetensors.ckpt").is_file()
    assert train("generator", world, out, config, "--resume") == 0
    resumed = load_bundle(out, kind="generator").tensors
    uninterrupted = load_bundle(models / "generator.safetensors", kind="generator").tensors
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def comparison(world: Path, models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """comparison.safetensors in the models directory, trained once with 2 folds."""
    config = write_config(tmp_path_factory.mktemp("cfg") / "c.yaml", {**COMPARISON, "folds": 2})
    out = models / "comparison.safetensors"
    assert train("comparison", world, out, config) == 0
    return out


def test_comparison_with_folds_loads_into_pipeline(models: Path, comparison: Path):
    out = comparison
    for i in range(2):
        fold = load_bundle(Path(f"{out}.folds") / f"fold{i}.safetensors", kind="segmenter")
        assert set(fold.metadata["holdout_indices"]).isdisjoint(fold.metadata["train_indices"])
    meta = load_bundle(out, kind="comparison").metadata
    assert meta["architecture"]["name"] == "synthcp_comparison"
    assert meta["predictions"] == "folds"
    assert 0.0 <= meta["metrics"]["fold0_holdout_miou"] <= 1.0
    assert "eval_failure_auroc" in meta["metrics"] and "eval_iou_mae" in meta["metrics"]

    pipeline = resynthesis_pipeline(models)
    image = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    result = pipeline.process(image)
    assert result.failure.shape == (H, W) and result.anomaly.shape == (H, W)
    assert (
        np.isfinite(result.failure).all() and ((0 <= result.failure) & (result.failure <= 1)).all()
    )
    assert result.class_iou.shape == (19,)


def test_comparison_given_predictions(world: Path, models: Path, tmp_path: Path):
    values = {
        **COMPARISON,
        "predictions": "given",
        "given_eval_fraction": 0.5,
        "segmenter": str(models / "segmenter.safetensors"),
        "generator": str(models / "generator.safetensors"),
    }
    out = tmp_path / "comparison.safetensors"
    assert train("comparison", world, out, write_config(tmp_path / "c.yaml", values)) == 0
    assert not Path(f"{out}.folds").exists()  # no fold segmenters in this mode
    bundle = load_bundle(out, kind="comparison")
    assert bundle.metadata["predictions"] == "given"


def test_comparison_resume_matches_uninterrupted(
    world: Path, models: Path, comparison: Path, tmp_path: Path
):
    values = {
        **COMPARISON,
        "segmenter": str(models / "segmenter.safetensors"),
        "generator": str(models / "generator.safetensors"),
    }
    config = write_config(tmp_path / "c.yaml", values)
    out = tmp_path / "comparison.safetensors"
    assert train("comparison", world, out, config, "--stop-after", "1") == 0
    assert not out.exists() and Path(f"{out}.folds/fold0.safetensors.ckpt").is_file()
    assert train("comparison", world, out, config, "--resume") == 0
    resumed = load_bundle(out, kind="comparison").tensors
    reference = load_bundle(comparison, kind="comparison").tensors
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    ("model", "values"),
    [
        ("comparison", {"predictions": "sometimes"}),
        ("comparison", {"preset": "huge"}),
        ("generator", {"bn": "frozen"}),
        ("generator", {"lr_gen": 0.1}),  # a typo is refused, not ignored
    ],
)
def test_bad_config_is_refused(model: str, values: dict, world: Path, tmp_path: Path, capsys):
    config = write_config(tmp_path / "bad.yaml", {**COMMON, **values})
    assert train(model, world, tmp_path / "x.safetensors", config) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


# -- the generator's losses, wired (the loss formulas themselves: test_resynthesis) --------
def _gan(k: int = 5):
    from segmentation_safety.models.generator import MultiscaleDiscriminator, SpadeGenerator

    torch.manual_seed(0)
    gen = SpadeGenerator(k, ngf=4, num_upsampling=2, hidden=8, norm="instance", spectral=False)
    disc = MultiscaleDiscriminator(k, ndf=4, n_layers=2, num_d=2, spectral=False)
    return gen, disc


def test_one_gan_step_trains_g_on_its_loss_and_d_on_its_own():
    from torch.nn.functional import relu

    from training.train_generator import GanTraining

    gen, disc = _gan()
    labels = torch.randint(0, 5, (2, 16, 32))
    image = torch.randint(0, 256, (2, 3, 16, 32), dtype=torch.uint8)
    loss, logs = GanTraining(gen, disc, feat_weight=10.0)({"label": labels, "image": image})
    loss.backward()
    got_g = [p.grad.clone() for p in gen.parameters()]
    got_d = [p.grad.clone() for p in disc.parameters()]

    # Independently (SPADE): G learns from -mean D(fake) + 10 x L1 feature matching with D
    # fixed; D from the hinge loss on real images in [-1, 1] and the detached fake.
    real = image.float() / 127.5 - 1.0
    fake = gen(labels)
    d_fake, d_real = disc(labels, fake), disc(labels, real)
    adversarial = sum(-s[-1].mean() for s in d_fake) / 2
    matching = sum(
        sum((f - r.detach()).abs().mean() for f, r in zip(fs[:-1], rs[:-1]))
        for fs, rs in zip(d_fake, d_real)
    )
    loss_g = adversarial + 10.0 * matching / 2
    want_g = torch.autograd.grad(loss_g, list(gen.parameters()), retain_graph=True)
    d_fake = disc(labels, fake.detach())
    loss_d = sum(relu(1 - r[-1]).mean() for r in d_real) / 2
    loss_d = loss_d + sum(relu(1 + f[-1]).mean() for f in d_fake) / 2
    want_d = torch.autograd.grad(loss_d, list(disc.parameters()))

    assert logs["loss_g"].item() == pytest.approx(loss_g.item(), rel=1e-5)
    assert logs["loss_d"].item() == pytest.approx(loss_d.item(), rel=1e-5)
    for got, want in zip(got_g + got_d, [*want_g, *want_d], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_gan_optimizer_ttur_rates_then_linear_decay_to_zero():
    from training.train_generator import make_optimizer

    gen, disc = _gan()
    config = {
        "lr_generator": 1e-4,
        "lr_discriminator": 4e-4,
        "betas": [0.0, 0.9],
        "iterations": 10,
        "decay_start": 0.5,
    }
    optimizer, scheduler = make_optimizer(gen, disc, config)
    g_group, d_group = optimizer.param_groups
    assert [id(p) for p in g_group["params"]] == [id(p) for p in gen.parameters()]
    assert [id(p) for p in d_group["params"]] == [id(p) for p in disc.parameters()]
    assert g_group["betas"] == (0.0, 0.9)
    rates = []
    for _ in range(10):
        rates += [g_group["lr"], d_group["lr"]]
        optimizer.step()
        scheduler.step()
    rates += [g_group["lr"], d_group["lr"]]
    # Constant for the first half (5 iterations), then (10 - i) / 5 of the rate.
    factors = [1.0] * 6 + [0.8, 0.6, 0.4, 0.2, 0.0]
    assert rates == pytest.approx([r * f for f in factors for r in (1e-4, 4e-4)])


def test_comparison_targets_are_each_images_held_out_fold_prediction_against_its_label():
    import torch.nn.functional as F

    from segmentation_safety.detectors.resynthesis import resynthesize
    from segmentation_safety.models.comparison import ComparisonNet
    from segmentation_safety.models.zoo import build_segmenter
    from training.losses.synthcp import comparison_loss
    from training.train_comparison import ComparisonTraining

    k = 5
    segs = []
    for seed in (1, 2, 3):  # fold 0, fold 1, the deployed segmenter
        torch.manual_seed(seed)
        segs.append(build_segmenter("tiny", num_classes=k, width=4).eval())
    gen, _ = _gan(k)
    gen.synthesis_scale = 1.0
    comparison = ComparisonNet(k, width=4, layers=[1, 1, 1, 1], fuse_channels=4)
    module = ComparisonTraining(comparison, segs[:2], gen, segs[2], torch.device("cpu")).eval()
    gen_ = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8, generator=gen_)
    label = torch.randint(0, k, (2, H, W), generator=gen_)
    label[:, :8] = 255  # void: no target there
    fold = torch.tensor([1, 0])
    loss, logs = module({"image": image, "label": label, "fold": fold})

    # Independently: image 0 predicted by fold 1's segmenter, image 1 by fold 0's; ŷ the
    # argmax of the bilinear logits at the image size; eq. 8 on (ŷ, label).
    with torch.no_grad():
        logits = torch.cat(
            [
                segs[1](segs[1].normalize(image[:1])).logits,
                segs[0](segs[0].normalize(image[1:])).logits,
            ]
        )
        pred = F.interpolate(logits, (H, W), mode="bilinear", align_corners=False).argmax(1)
        synth = resynthesize(gen, logits, segs[2], (H, W))
        out = comparison(segs[2].normalize(image), synth, logits.softmax(1))
        want = comparison_loss(out.class_iou, out.correct_logit, pred, label)
        _, _, probs, got_pred = module.predict(image, fold)
    torch.testing.assert_close(probs, logits.softmax(1))
    assert torch.equal(got_pred, pred)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    wrong = ((pred != label) & (label != 255)).float().mean()
    assert logs["error_rate"].item() == pytest.approx(wrong.item())
    # The folds really differ: the other assignment predicts otherwise.
    assert not torch.equal(module.predict(image, 1 - fold)[3], pred)
