"""Training loops, checkpoints and presets for level clocks (the quick-reference seed's API).

Each step runs one forward/backward pass, then steps and zeroes only the levels whose clock
fires (`nestlearn.optim.level_clock`): slower levels keep summing gradients in `.grad` until
their chunk is complete. Steps are 0-indexed; `num_steps` is the step count at which the loop
stops, so `train_loop(..., num_steps=N, start_step=k)` continues a run checkpointed after k.

The checkpoint helpers are named `save_level_checkpoint` / `load_level_checkpoint` (not the
seed's `save_checkpoint` / `load_checkpoint`) because `nestlearn.train.checkpoint` already has
those names for language-model runs; the keyword arguments are the seed's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from nestlearn.config.errors import ConfigError
from nestlearn.config.loader import PACKAGE_CONFIGS
from nestlearn.models.nested_mlp import LEVEL_NAMES, NestedModelWithSurprise
from nestlearn.optim.level_clock import (
    ChunkedUpdateScheduler,
    apply_level_updates,
    setup_optimizers,
)
from nestlearn.optim.surprise import SurpriseLossComputer
from nestlearn.train.checkpoint import CheckpointError
from nestlearn.train.progress import Progress, ProgressMode
from nestlearn.utils.io import atomic_directory, atomic_write_json, read_json, sha256_file
from nestlearn.utils.seeding import capture_rng_state, restore_rng_state

Batch = tuple[torch.Tensor, torch.Tensor]
DataSource = Iterable[Batch] | Callable[[int], Batch]
"""Either a function of the step index (exact resumption for free: step k gets the same batch
in a resumed run) or an iterable of (inputs, targets), re-iterated when exhausted (epochs)."""


@dataclass
class LevelHistory:
    """Per step: main loss, total auxiliary loss (0.0 when not computed) and per-level
    auxiliary losses (NaN when not computed); per level: the steps it fired at and its
    total update count from the scheduler (including firings before `start_step`)."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    aux_losses: list[float] = field(default_factory=list)
    aux_per_level: dict[str, list[float]] = field(default_factory=dict)
    fired: dict[str, list[int]] = field(default_factory=dict)
    update_counts: dict[str, int] = field(default_factory=dict)


def _batches(source: DataSource, start_step: int) -> Iterator[Batch]:
    if callable(source):
        step = start_step
        while True:
            yield source(step)
            step += 1
    while True:
        empty = True
        for batch in source:
            empty = False
            yield batch
        if empty:
            raise ValueError("the dataloader yielded no batches (a one-pass iterator is spent "
                             "after one epoch: pass a re-iterable or a function of the step)")


def _check_setup(optimizers: Mapping[str, torch.optim.Optimizer],
                 scheduler: ChunkedUpdateScheduler, num_steps: int, start_step: int) -> None:
    if set(optimizers) != set(scheduler.levels):
        raise ValueError(f"optimizers are for levels {sorted(optimizers)}, "
                         f"the scheduler has {sorted(scheduler.levels)}")
    if not 0 <= start_step <= num_steps:
        raise ValueError(f"need 0 <= start_step <= num_steps, got {start_step} and {num_steps}")


def train_loop(
    model: nn.Module,
    dataloader: DataSource,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizers: Mapping[str, torch.optim.Optimizer],
    scheduler: ChunkedUpdateScheduler,
    num_steps: int,
    device: torch.device | str,
    start_step: int = 0,
    log_interval: int = 100,
    progress: ProgressMode = "auto",
) -> LevelHistory:
    """Train steps start_step .. num_steps-1 with per-level clocks; return the history.

    `progress`: a tqdm bar on a terminal ("auto"), else a line every `log_interval` steps.
    """
    return _run(model, dataloader, criterion, optimizers, scheduler, None, num_steps, device,
                start_step, log_interval, progress, every_n=1)


def train_loop_with_surprise(
    model: NestedModelWithSurprise,
    dataloader: DataSource,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizers: Mapping[str, torch.optim.Optimizer],
    scheduler: ChunkedUpdateScheduler,
    surprise_computer: SurpriseLossComputer,
    num_steps: int,
    device: torch.device | str,
    start_step: int = 0,
    log_interval: int = 100,
    use_surprise: bool = True,
    compute_surprise_every_n_steps: int = 1,
    progress: ProgressMode = "auto",
) -> LevelHistory:
    """`train_loop` plus surprise objectives on steps with step % every_n == 0.

    The auxiliary gradients join the main ones in `.grad`, so a slow level's chunk sum
    includes them. `use_surprise=False` trains on the main loss alone (the baseline).
    """
    if compute_surprise_every_n_steps < 1:
        raise ValueError(f"compute_surprise_every_n_steps must be >= 1, "
                         f"got {compute_surprise_every_n_steps}")
    return _run(model, dataloader, criterion, optimizers, scheduler,
                surprise_computer if use_surprise else None, num_steps, device, start_step,
                log_interval, progress, every_n=compute_surprise_every_n_steps)


def _run(
    model: nn.Module,
    dataloader: DataSource,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizers: Mapping[str, torch.optim.Optimizer],
    scheduler: ChunkedUpdateScheduler,
    surprise: SurpriseLossComputer | None,
    num_steps: int,
    device: torch.device | str,
    start_step: int,
    log_interval: int,
    progress: ProgressMode,
    every_n: int,
) -> LevelHistory:
    _check_setup(optimizers, scheduler, num_steps, start_step)
    if surprise is not None and not isinstance(model, NestedModelWithSurprise):
        raise TypeError("surprise objectives need a NestedModelWithSurprise")
    weighted = list(surprise.loss_weights) if surprise is not None else []
    history = LevelHistory(aux_per_level={level: [] for level in weighted},
                           fired={level: [] for level in scheduler.levels})
    model.to(device)
    model.train()
    batches = _batches(dataloader, start_step)
    with Progress(num_steps, progress, initial=start_step, desc="levels",
                  every_steps=log_interval) as bar:
        for step in range(start_step, num_steps):
            x, y = (t.to(device) for t in next(batches))
            aux_levels: dict[str, torch.Tensor] = {}
            if surprise is not None and step % every_n == 0:
                assert isinstance(model, NestedModelWithSurprise)
                out = model.forward_with_surprise(x)
                loss = criterion(out.output, y)
                aux, aux_levels = surprise.compute(loss, out.activations, out.predictions)
                torch.autograd.backward(loss + aux)
            else:
                loss = criterion(model(x), y)
                aux = loss.new_zeros(())
                torch.autograd.backward(loss)
            fired = apply_level_updates(optimizers, scheduler, step)
            history.steps.append(step)
            history.losses.append(loss.item())
            history.aux_losses.append(aux.item())
            for level in weighted:
                value = aux_levels.get(level)
                history.aux_per_level[level].append(math.nan if value is None else value.item())
            for level in fired:
                history.fired[level].append(step)
            shown = {"aux": history.aux_losses[-1]} if surprise is not None else {}
            bar.update(step + 1, loss=history.losses[-1], **shown, fired=",".join(fired) or "-")
    history.update_counts = dict(scheduler.update_counts)
    return history


# --- checkpoints -------------------------------------------------------------------------

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
GRADS_FILE = "grads.safetensors"
OPTIMIZERS_FILE = "optimizers.pt"
STATE_FILE = "level_state.json"


def save_level_checkpoint(
    model: nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer],
    scheduler: ChunkedUpdateScheduler,
    global_step: int,
    save_path: str | Path,
) -> Path:
    """Write a checkpoint directory at `save_path` atomically; resume with start_step=global_step.

    Holds weights and the pending (not yet applied) gradients of slow levels in safetensors,
    optimizer and RNG states for `torch.load(weights_only=True)`, and the step, scheduler
    state and sha256 of each file in JSON. Without the pending gradients, a run saved in the
    middle of a slow level's chunk would lose that chunk's accumulation.
    """
    final = Path(save_path)
    with atomic_directory(final) as tmp:
        weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS_FILE))
        grads = {n: p.grad.detach().contiguous() for n, p in model.named_parameters()
                 if p.grad is not None}
        save_file(grads, str(tmp / GRADS_FILE))
        torch.save({"optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                    "rng": capture_rng_state()}, tmp / OPTIMIZERS_FILE)
        atomic_write_json(tmp / STATE_FILE, {
            "format_version": FORMAT_VERSION,
            "global_step": global_step,
            "scheduler": scheduler.state_dict(),
            "sha256": {name: sha256_file(tmp / name)
                       for name in (WEIGHTS_FILE, GRADS_FILE, OPTIMIZERS_FILE)},
        })
    return final


def load_level_checkpoint(
    checkpoint_path: str | Path,
    model: nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer],
    scheduler: ChunkedUpdateScheduler,
    restore_rng: bool = True,
) -> int:
    """Verify and restore everything `save_level_checkpoint` wrote; return the global step."""
    path = Path(checkpoint_path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(path, f"no {STATE_FILE} (not a level-clock checkpoint)")
    state: dict[str, Any] = read_json(path / STATE_FILE)
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(path, f"unknown format version {state.get('format_version')!r}")
    for name, digest in state["sha256"].items():
        if not (path / name).is_file() or sha256_file(path / name) != digest:
            raise CheckpointError(path, f"{name} is missing or does not match its sha256")
    try:
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        grads = load_file(str(path / GRADS_FILE))
        for name, p in model.named_parameters():
            p.grad = grads[name].to(p.device) if name in grads else None
        blob = torch.load(path / OPTIMIZERS_FILE, map_location="cpu", weights_only=True)
        if set(blob["optimizers"]) != set(optimizers):
            raise ValueError(f"optimizers for {sorted(blob['optimizers'])}, "
                             f"given {sorted(optimizers)}")
        for level, opt in optimizers.items():
            opt.load_state_dict(blob["optimizers"][level])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(path, f"does not fit: {exc}") from exc
    if restore_rng:
        restore_rng_state(blob["rng"])
    return int(state["global_step"])


# --- presets -----------------------------------------------------------------------------

PRESET_DIR = PACKAGE_CONFIGS / "level_clock"
PRESET_NAMES = ("small", "standard", "large")


@dataclass(frozen=True)
class LevelClockPreset:
    """One of the quick reference's configurations (configs/level_clock/*.yaml)."""

    input_size: int
    hidden_size: int
    chunk_sizes: dict[str, int]
    surprise_weights: dict[str, float]
    gradient_clip_value: float = 10.0
    base_lr: float = 1e-4


def _positive(value: Any, key: str, source: str, kind: type[int] | type[float]) -> Any:
    ok = not isinstance(value, bool) and isinstance(value, int if kind is int else int | float)
    if not ok or value <= 0:
        raise ConfigError(key, value, f"a positive {kind.__name__}", source)
    return kind(value)


def _mapping(tree: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = tree[key]
    if not isinstance(value, dict):
        raise ConfigError(key, value, "a mapping level -> number", source)
    unknown = [k for k in value if k not in LEVEL_NAMES]
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", value[unknown[0]],
                          f"a level among {', '.join(LEVEL_NAMES)}", source)
    return value


def load_level_clock_preset(name_or_path: str | Path) -> LevelClockPreset:
    """Load `small`, `standard`, `large` or a YAML path; a bad file is a one-line ConfigError
    naming the key, the value, what is accepted and the file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        if str(name_or_path) not in PRESET_NAMES:
            raise ConfigError("preset", str(name_or_path),
                              f"one of {', '.join(PRESET_NAMES)} or a .yaml path")
        path = PRESET_DIR / f"{name_or_path}.yaml"
    source = str(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError("<file>", source, f"a readable YAML file ({type(exc).__name__})") from None
    if not isinstance(tree, dict):
        raise ConfigError("<file>", type(tree).__name__, "a mapping at the top level", source)
    fields = {f.name: f for f in dataclasses.fields(LevelClockPreset)}
    for key in tree:
        if key not in fields:
            raise ConfigError(str(key), tree[key], f"one of the keys {', '.join(fields)}", source)
    for name, f in fields.items():
        if f.default is dataclasses.MISSING and name not in tree:
            raise ConfigError(name, None, "a value (the key is required)", source)
    chunks = _mapping(tree, "chunk_sizes", source)
    missing = [level for level in LEVEL_NAMES if level not in chunks]
    if missing:
        raise ConfigError(f"chunk_sizes.{missing[0]}", None, "a positive int (every level "
                          "needs a chunk size)", source)
    return LevelClockPreset(
        input_size=_positive(tree["input_size"], "input_size", source, int),
        hidden_size=_positive(tree["hidden_size"], "hidden_size", source, int),
        chunk_sizes={k: _positive(v, f"chunk_sizes.{k}", source, int) for k, v in chunks.items()},
        surprise_weights={k: _positive(v, f"surprise_weights.{k}", source, float)
                          for k, v in _mapping(tree, "surprise_weights", source).items()},
        gradient_clip_value=_positive(tree.get("gradient_clip_value", 10.0),
                                      "gradient_clip_value", source, float),
        base_lr=_positive(tree.get("base_lr", 1e-4), "base_lr", source, float),
    )


def build_from_preset(
    preset: LevelClockPreset,
    optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
) -> tuple[NestedModelWithSurprise, ChunkedUpdateScheduler, dict[str, torch.optim.Optimizer],
           SurpriseLossComputer]:
    """Model, scheduler, per-level optimizers (`setup_optimizers`' lr rule) and surprise computer."""
    model = NestedModelWithSurprise(preset.input_size, preset.hidden_size)
    optimizers = setup_optimizers(model, preset.chunk_sizes, preset.base_lr, optimizer_cls)
    surprise = SurpriseLossComputer(preset.surprise_weights, preset.gradient_clip_value)
    return model, ChunkedUpdateScheduler(preset.chunk_sizes), optimizers, surprise
