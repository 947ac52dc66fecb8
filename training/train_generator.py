"""Train the SPADE generator of the resynthesis detector (SynthCP §3.1).

SynthCP trains a semantic-to-image cGAN on ground-truth (label map, image) pairs and
later feeds it the *predicted* label map. We follow SPADE's recipe as SynthCP uses it
(no instance maps, no style encoder):

- a multi-scale PatchGAN discriminator on label ⊕ image, hinge loss;
- the generator loss is the hinge term plus λ_feat = 10 × discriminator feature matching;
- Adam with TTUR: G at lr/2, D at 2·lr, betas (0, 0.9); the learning rate is constant
  for the first half of training and then decays linearly to zero.

Differences from SPADE, on purpose:

- **No VGG perceptual loss.** It needs ImageNet-pretrained VGG-19 weights, which cannot
  be downloaded here; feature matching carries the reconstruction signal alone.
- **One optimizer step per iteration for both networks.** The engine takes one loss
  and one optimizer, so G and D are updated simultaneously from the same fake batch
  (SPADE updates G first and re-generates the fake for D's step). Each network still
  only learns from its own loss: D's weights are frozen while the G loss is built, and
  D sees a detached fake for its own loss. Adam keeps per-parameter state, so one Adam
  with a parameter group per network is the same as SPADE's two optimizers.

Writes a ``generator`` bundle (the layout of ``ResynthesisDetector.export_part``) with
the L1 distance between G(y) and x on val images as its metric.

    segsafe train generator --data DIR --out models/generator.safetensors
    torchrun --nproc-per-node 2 -m training.cli generator --data DIR --out ...
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from segmentation_safety.detectors.resynthesis import PRESETS
from segmentation_safety.labels import NUM_CLASSES, TRAIN_NAMES
from segmentation_safety.models.generator import MultiscaleDiscriminator, SpadeGenerator
from training import engine
from training.config import ConfigError
from training.losses.synthcp import discriminator_loss, generator_loss

#: Discriminator per generator preset: "paper" is SPADE's multi-scale discriminator
#: (ndf 64, 4 layers, 2 scales); "tiny" keeps the two networks in balance for the demo.
DISCRIMINATOR_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"ndf": 64, "n_layers": 4, "num_d": 2},
    "tiny": {"ndf": 16, "n_layers": 3, "num_d": 2},
}


def to_generator_range(image: torch.Tensor) -> torch.Tensor:
    """uint8 images (0..255) -> float in [-1, 1], the range of the generator's tanh."""
    return image.float() / 127.5 - 1.0


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Build graphs through ``module`` without gradients to its own weights."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def split_fake_real(
    outputs: list[list[torch.Tensor]],
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Discriminator outputs of a [fake; real] batch -> (fake outputs, real outputs)."""
    fake = [[t[: t.shape[0] // 2] for t in scale] for scale in outputs]
    real = [[t[t.shape[0] // 2 :] for t in scale] for scale in outputs]
    return fake, real


class GanTraining(nn.Module):
    """Generator + discriminator and both hinge losses: ``forward(batch) -> (loss, logs)``.

    The returned loss is ``loss_G + loss_D``; their gradients do not mix (see the module
    docstring), so one backward pass and one optimizer step train both networks.
    """

    def __init__(
        self, generator: SpadeGenerator, discriminator: MultiscaleDiscriminator, feat_weight: float
    ) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.feat_weight = feat_weight

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        labels = batch["label"]
        real = to_generator_range(batch["image"])
        fake = self.generator(labels)
        # SPADE runs fake and real through D as one batch so that both see the same
        # normalisation statistics.
        both_labels = torch.cat([labels, labels])

        with frozen(self.discriminator):
            pred_fake, pred_real = split_fake_real(
                self.discriminator(both_labels, torch.cat([fake, real]))
            )
        loss_g = generator_loss(pred_fake, pred_real, self.feat_weight)

        pred_fake, pred_real = split_fake_real(
            self.discriminator(both_labels, torch.cat([fake.detach(), real]))
        )
        loss_d = discriminator_loss(pred_real, pred_fake)
        return loss_g + loss_d, {"loss_g": loss_g.detach(), "loss_d": loss_d.detach()}


def make_optimizer(
    generator: nn.Module, discriminator: nn.Module, config: dict[str, Any]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam with TTUR learning rates per network; constant, then linear decay to zero."""
    optimizer = torch.optim.Adam(
        [
            {"params": list(generator.parameters()), "lr": float(config["lr_generator"])},
            {"params": list(discriminator.parameters()), "lr": float(config["lr_discriminator"])},
        ],
        betas=(float(config["betas"][0]), float(config["betas"][1])),
    )
    iterations = int(config["iterations"])
    start = int(round(iterations * float(config["decay_start"])))

    def constant_then_linear(i: int) -> float:
        if i < start:
            return 1.0
        return max(0.0, (iterations - i) / max(1, iterations - start))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, constant_then_linear)


def load_pair(item: dict[str, Any], config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset item -> (image, label) tensors at ``image_size`` (if set)."""
    image, label = engine.sample_tensors(item)
    if config["image_size"]:
        image, label = engine.resize(image, label, config["image_size"])
    return image, label


def augmenter(dataset: Any, config: dict[str, Any]) -> Any:
    """``make_sample(index, generator)`` for the engine: resize, then crop / flip."""
    return engine.augmented_samples(dataset, config, load=lambda item: load_pair(item, config))


@torch.no_grad()
def evaluate_reconstruction(
    generator: SpadeGenerator,
    dataset: Any,
    config: dict[str, Any],
    device: torch.device,
) -> dict[str, float]:
    """Mean absolute difference between G(y) and x on val images, both in [0, 1].

    A GAN is not trained to reproduce x, so this is a sanity measure (a collapsed or
    diverged generator shows up as a large value), not a quality score.
    """
    was_training = generator.training
    generator.eval()
    total, count = 0.0, 0
    limit = config["eval_max_images"]
    for i in range(len(dataset) if limit is None else min(int(limit), len(dataset))):
        image, label = load_pair(dataset[i], config)
        fake = generator(label[None].to(device))
        real = to_generator_range(image[None].to(device))
        total += float((fake - real).abs().mean()) / 2.0  # [-1, 1] distances -> [0, 1]
        count += 1
    generator.train(was_training)
    return {"val_l1": total / max(1, count)}


def train(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    if config["preset"] not in PRESETS:
        raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {config['preset']!r}")
    if config["bn"] not in ("train", "sync"):
        # The generator normalises with batch statistics by design; freezing them would
        # leave its BatchNorm at the initial running averages.
        raise ConfigError(f"bn must be 'train' or 'sync' for the generator, got {config['bn']!r}")
    with engine.open_run(config["device"], int(config["seed"]), bool(config["amp"])) as ctx:
        train_set = engine.open_split(args.data, "train")
        val_set = engine.open_split(args.data, "val")

        gen_options = {**PRESETS[config["preset"]]["generator"], **config["generator_options"]}
        disc_options = {
            **DISCRIMINATOR_PRESETS.get(config["preset"], {}),
            **config["discriminator_options"],
        }
        try:
            generator = SpadeGenerator(NUM_CLASSES, **gen_options)
            discriminator = MultiscaleDiscriminator(NUM_CLASSES, **disc_options)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"generator_options / discriminator_options: {e}") from None
        generator = engine.apply_bn_mode(generator, config["bn"], ctx)
        module = GanTraining(generator, discriminator, float(config["feat_weight"]))
        optimizer, scheduler = make_optimizer(generator, discriminator, config)
        make_sample = augmenter(train_set, config)
        if not engine.run_stage(
            ctx,
            module,
            optimizer,
            scheduler,
            make_sample,
            len(train_set),
            config,
            args,
            "generator",
        ):
            return {"stopped": True}

        metrics = evaluate_reconstruction(generator, val_set, config, ctx.device)
        # SyncBatchNorm (bn: sync) is an implementation detail of training: save plain
        # weights under the architecture's own description, as export_part does.
        metadata = {
            "kind": "generator",
            "architecture": generator.architecture(),
            # The detector runs the generator at this fraction of the frame's size.
            "synthesis_scale": float(config["synthesis_scale"]),
            "class_names": list(TRAIN_NAMES),
            "input_size": list(load_pair(val_set[0], config)[0].shape[-2:]),
            "training": engine.training_metadata(config, args),
            "losses": "hinge GAN + 10 x feature matching; no VGG loss (no pretrained weights)",
            "metrics": metrics,
        }
        engine.write_bundle(ctx, args.out, generator.state_dict(), metadata)
        return metrics
