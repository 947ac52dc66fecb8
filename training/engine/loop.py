"""The training loop every trainer shares: seeds, devices, AMP, DDP, logs and checkpoints.

A trainer builds a module whose ``forward(batch)`` returns ``(loss, logs)`` and hands it
to :func:`fit` with its optimizer, scheduler and a :class:`SampleStream`. Everything
that decides the result is reproducible from the seed and the iteration number:

- **Data order** is a pure function of ``(seed, iteration)``: the stream of samples is
  one seeded permutation of the dataset per epoch, cut into global batches of
  ``batch_size × world_size``; rank r takes the r-th slice of each global batch (the
  sharding of ``DistributedSampler``, with the same seed on every rank).
- **Augmentation** draws from a generator seeded by the sample's position in that
  stream, so it does not depend on the number of ranks or data-loader workers.
- **Everything else random** (dropout) uses the global RNGs, whose states go into the
  checkpoint. All ranks seed them identically and consume them identically, so rank 0's
  states stand for every rank.

The training state (model, optimizer, scheduler, AMP scaler, RNG states, iteration) is
written atomically to ``<out>.ckpt`` every ``checkpoint_every`` iterations and loaded
with ``torch.load(weights_only=True)``, so ``--resume`` after a kill reproduces the
uninterrupted run exactly (on CPU; cuDNN kernels may differ in the last bits on GPU).

DDP (``torchrun --nproc-per-node N``): gloo on CPU, nccl on CUDA. Rank 0 alone writes
checkpoints, TensorBoard logs and bundles. BatchNorm statistics are per rank unless the
trainer asks for ``sync`` (SyncBatchNorm, CUDA only) or ``frozen`` (eval-mode BN, the
usual choice for fine-tuning with small per-GPU batches, and what the CPU DDP test uses).
"""

from __future__ import annotations

import io
import os
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from segmentation_safety.checkpoint import atomic_write_bytes
from segmentation_safety.device import resolve_device
from segmentation_safety.errors import MissingFileError, UserError

BN_MODES = ("train", "frozen", "sync")


# --------------------------------------------------------------------------- run context


@dataclass
class RunContext:
    """Where and how this process trains."""

    device: torch.device
    seed: int
    rank: int = 0
    world_size: int = 1
    amp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_run(device: str = "auto", seed: int = 0, amp: bool = True) -> RunContext:
    """Set up this process: device, process group under torchrun, seeds, AMP.

    AMP (fp16 autocast + GradScaler) is used only on CUDA; on CPU it is always off.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = resolve_device(device)
    if world_size > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    # Same seed on every rank: identical initial weights and identical RNG streams.
    seed_everything(seed)
    return RunContext(dev, seed, rank, world_size, amp=amp and dev.type == "cuda")


def close_run(ctx: RunContext) -> None:
    """Leave the process group (if any) once every rank is done."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def open_run(device: str = "auto", seed: int = 0, amp: bool = True) -> Iterator[RunContext]:
    """:func:`init_run` for the ``with`` block, :func:`close_run` however the block ends.

    A trainer that returns early (``--stop-after``) closes its run as one that finishes.
    On an exception the process group is destroyed without the barrier: the other ranks
    may have failed as well and would never reach it.
    """
    ctx = init_run(device, seed, amp)
    try:
        yield ctx
    except BaseException:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()
        raise
    close_run(ctx)


# --------------------------------------------------------------------------- data order


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator for the augmentation of the sample at ``position`` in the stream."""
    # A large odd multiplier keeps streams of nearby seeds apart.
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + position) % 2**63)


class SampleStream:
    """The endless, seeded sequence of dataset indices trainers draw from.

    Position p of the stream is ``perm_e[p % n]`` with e = p // n and ``perm_e`` a
    permutation drawn from ``seed`` and e. Global batch i covers positions
    ``[i·B·W, (i+1)·B·W)``; rank r gets ``[i·B·W + r·B, i·B·W + (r+1)·B)``.
    """

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool = True) -> None:
        if size < 1:
            raise ValueError("cannot train on an empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, torch.Tensor] = {}

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if not self.shuffle:
            return offset
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.size, generator=gen)}
        return int(self._perms[epoch][offset])

    def positions(self, iteration: int, rank: int = 0, world_size: int = 1) -> range:
        start = (iteration * world_size + rank) * self.batch_size
        return range(start, start + self.batch_size)


class _PositionBatches(Sampler[list[int]]):
    def __init__(self, stream: SampleStream, start: int, stop: int, rank: int, world: int) -> None:
        self.stream, self.start, self.stop, self.rank, self.world = stream, start, stop, rank, world

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[int]]:
        for it in range(self.start, self.stop):
            yield list(self.stream.positions(it, self.rank, self.world))


class _StreamDataset(Dataset):
    """Maps a stream position to ``make_sample(dataset index, augmentation generator)``."""

    def __init__(
        self, stream: SampleStream, make_sample: Callable[[int, torch.Generator], Any]
    ) -> None:
        self.stream = stream
        self.make_sample = make_sample

    def __len__(self) -> int:  # positions are unbounded; the sampler decides
        return sys.maxsize

    def __getitem__(self, position: int) -> Any:
        return self.make_sample(
            self.stream.index(position), sample_generator(self.stream.seed, position)
        )


def batches(
    ctx: RunContext,
    stream: SampleStream,
    make_sample: Callable[[int, torch.Generator], Any],
    start: int,
    stop: int,
    workers: int = 0,
) -> DataLoader:
    """This rank's batches for iterations ``start`` to ``stop - 1``."""
    return DataLoader(
        _StreamDataset(stream, make_sample),
        batch_sampler=_PositionBatches(stream, start, stop, ctx.rank, ctx.world_size),
        num_workers=workers,
        # Its own generator: otherwise creating the iterator draws a worker seed from the
        # global RNG, and a resumed run would be one draw off the uninterrupted one.
        generator=torch.Generator().manual_seed(stream.seed),
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=False,
    )


# --------------------------------------------------------------------------- batch norm


def apply_bn_mode(model: nn.Module, mode: str, ctx: RunContext) -> nn.Module:
    """Prepare BatchNorm layers for ``mode`` (see module docstring); returns the model."""
    if mode not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {mode!r}")
    if mode == "sync" and ctx.distributed:
        if ctx.device.type != "cuda":
            raise ValueError("bn: 'sync' (SyncBatchNorm) needs CUDA; use 'frozen' for CPU DDP")
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode (running statistics fixed, affine trains)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_bn_mode(model: nn.Module, training: bool, mode: str) -> None:
    """After ``train(training)`` of a module holding ``model``: with bn ``mode`` "frozen",
    put ``model``'s BatchNorm layers back in eval mode while training."""
    if training and mode == "frozen":
        freeze_batchnorm(model)


def poly_lambda(iterations: int, power: float = 0.9) -> Callable[[int], float]:
    """The poly learning-rate factor (1 - i/N)^power used by torchvision's references."""
    return lambda i: (1.0 - min(i, iterations) / iterations) ** power


# --------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and primitive containers (weights_only-loadable)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(out: str | os.PathLike[str]) -> Path:
    """The training-state file beside the bundle ``out``: ``<out>.ckpt``."""
    return Path(f"{out}.ckpt")


def log_dir(out: str | os.PathLike[str]) -> Path:
    """TensorBoard directory beside the bundle ``out``: ``<out>.runs/``."""
    return Path(f"{out}.runs")


@dataclass
class Trainable:
    """What :func:`fit` trains; ``module.forward(batch)`` returns ``(loss, logs)``."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def save_training_state(
    path: Path, trainable: Trainable, scaler: torch.amp.GradScaler, iteration: int, meta: dict
) -> None:
    state = {
        "iteration": iteration,
        "meta": meta,
        "model": trainable.module.state_dict(),
        "optimizer": trainable.optimizer.state_dict(),
        "scheduler": trainable.scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


class TrainingStateError(UserError, RuntimeError):
    """A training state (``<out>.ckpt``) that cannot be resumed; the message names it."""


#: What a training state holds (:func:`save_training_state`).
STATE_KEYS = ("iteration", "meta", "model", "optimizer", "scheduler", "scaler", "rng")


def read_training_state(path: Path) -> dict[str, Any]:
    """The state saved at ``path``; a missing, unreadable or foreign file is refused."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"--resume: no training state at {path}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or pickled objects
        # torch's own text would advise weights_only=False, which runs the file's code.
        raise TrainingStateError(
            f"--resume: {path} ({len(data)} bytes) is not a readable training state "
            f"({type(e).__name__}); delete it, or pass --restart, to train from the start"
        ) from None
    if not isinstance(state, dict) or not all(k in state for k in STATE_KEYS):
        raise TrainingStateError(f"--resume: {path} is not a training state written by segsafe")
    return state


def load_training_state(
    path: Path, trainable: Trainable, scaler: torch.amp.GradScaler, meta: dict
) -> int:
    """Restore everything saved by :func:`save_training_state`; return the iteration.

    ``meta`` must match what the state was written with: the data order (global batch,
    seed) and the run's settings (``config``, ``data``). A resumed run under other
    settings would mix two runs and write a bundle whose metadata describes neither.
    """
    state = read_training_state(path)
    for key, value in meta.items():
        saved = state["meta"].get(key)
        if key == "config" and isinstance(saved, dict) and isinstance(value, dict):
            changed = sorted(k for k in {*saved, *value} if saved.get(k) != value.get(k))
            if changed:
                what = ", ".join(f"{k}: {saved.get(k)!r} -> {value.get(k)!r}" for k in changed)
                raise TrainingStateError(
                    f"--resume: {path} was written under other settings ({what}); resume "
                    "with the same config, or pass --restart to train from the start"
                )
        elif key in state["meta"] and saved != value:
            raise TrainingStateError(
                f"--resume: {path} was written with {key}={saved!r}, this run has {value!r}; "
                "resume with the same settings, or pass --restart to train from the start"
            )
    try:
        trainable.module.load_state_dict(state["model"])
        trainable.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise TrainingStateError(
            f"--resume: {path} holds a model other than this run's ({first})"
        ) from None
    trainable.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    # Else AMP was off on one side (a CPU run resumed on CUDA, or the reverse: device may
    # change on resume): the scaler starts afresh, finding its scale in a few steps.
    set_rng_state(state["rng"])
    return int(state["iteration"])


# --------------------------------------------------------------------------- the loop


@dataclass
class LoopConfig:
    """The loop's knobs, taken from a trainer's config and the CLI."""

    iterations: int
    out: Path
    resume: bool = False
    checkpoint_every: int = 100
    log_every: int = 10
    grad_clip: float = 0.0
    workers: int = 0
    #: Stop (as a kill would) after this many iterations, with a checkpoint written.
    stop_after: int | None = None
    #: Start from iteration 0 even where ``<out>.ckpt`` holds a run (else refused).
    restart: bool = False
    #: The run's settings, checked on resume (``load_training_state``).
    identity: dict[str, Any] = field(default_factory=dict)


def fit(
    ctx: RunContext,
    trainable: Trainable,
    stream: SampleStream,
    make_sample: Callable[[int, torch.Generator], Any],
    loop: LoopConfig,
    desc: str = "train",
) -> bool:
    """Train ``trainable`` for ``loop.iterations`` iterations (resuming if asked).

    Returns True when all iterations are done, False when ``stop_after`` cut it short.
    """
    module = trainable.module.to(ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp)
    ckpt = checkpoint_path(loop.out)
    # A resumed run must cut the stream into the same global batches.
    meta = {"global_batch": stream.batch_size * ctx.world_size, "seed": stream.seed}
    meta.update(loop.identity)
    if not loop.resume and not loop.restart and ckpt.is_file():
        # Starting over would overwrite the killed run's progress at the first checkpoint.
        done = _saved_iteration(ckpt)
        raise TrainingStateError(
            f"{ckpt} holds a run{f' at iteration {done}' if done is not None else ''}: pass "
            "--resume to continue it, or --restart to train from the start (it is replaced)"
        )
    start = load_training_state(ckpt, trainable, scaler, meta) if loop.resume else 0
    if ctx.is_main:  # writes a kill cut short (the checkpoint and bundle themselves are whole)
        for target in (ckpt, Path(loop.out)):
            for partial in target.parent.glob(f".{target.name}.*.tmp"):
                partial.unlink(missing_ok=True)
    stop = loop.iterations if loop.stop_after is None else min(loop.iterations, loop.stop_after)
    if start > loop.iterations:
        raise TrainingStateError(
            f"--resume: {ckpt} is at iteration {start}, past this run's iterations "
            f"{loop.iterations}; the bundle would claim fewer iterations than it had"
        )
    if start == loop.iterations:
        return True

    net: nn.Module = module
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(module, device_ids=ids)
    writer = _summary_writer(loop.out) if ctx.is_main else None
    module.train()
    progress = tqdm(
        total=loop.iterations, initial=start, desc=desc, disable=not ctx.is_main, unit="it"
    )
    iteration = start
    for batch in batches(ctx, stream, make_sample, start, stop, loop.workers):
        batch = _to_device(batch, ctx.device)
        with torch.autocast(ctx.device.type, dtype=torch.float16, enabled=ctx.amp):
            loss, logs = net(batch)
        trainable.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if loop.grad_clip > 0:
            scaler.unscale_(trainable.optimizer)
            nn.utils.clip_grad_norm_(module.parameters(), loop.grad_clip)
        scaler.step(trainable.optimizer)
        scaler.update()
        trainable.scheduler.step()
        iteration += 1

        loss = loss.detach()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {float(loss)} at iteration {iteration}")
        progress.update(1)
        if ctx.is_main and (iteration % loop.log_every == 0 or iteration == stop):
            progress.set_postfix(loss=f"{float(loss):.4f}")
        if writer is not None and (iteration % loop.log_every == 0 or iteration == stop):
            writer.add_scalar(f"{desc}/loss", float(loss), iteration)
            writer.add_scalar(f"{desc}/lr", trainable.optimizer.param_groups[0]["lr"], iteration)
            for name, value in logs.items():
                value = value.detach() if isinstance(value, torch.Tensor) else value
                writer.add_scalar(f"{desc}/{name}", float(value), iteration)
        if ctx.is_main and (iteration % loop.checkpoint_every == 0 or iteration == stop):
            save_training_state(ckpt, trainable, scaler, iteration, meta)
    progress.close()
    if writer is not None:
        writer.close()
    if ctx.distributed:
        dist.barrier()  # nobody reads the checkpoint or writes a bundle before rank 0 is done
    return stop >= loop.iterations


def _saved_iteration(path: Path) -> int | None:
    try:
        return int(read_training_state(path)["iteration"])
    except (UserError, KeyError, TypeError, ValueError):
        return None


def _summary_writer(out: Path) -> Any:
    """A TensorBoard writer, or None (with a notice) where tensorboard is not installed.

    tensorboard comes with the ``train`` extra only; a plain ``pip install -e .`` must
    still train, just without the curves.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        print(f"note: no TensorBoard logging ({e}); pip install tensorboard", file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(log_dir(out)))


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
