"""Checkpoints that hold everything needed to continue a run exactly, and that can be trusted.

A checkpoint is a directory `root/step_000100/` written into a hidden temporary sibling and
renamed into place, so an interrupted save never leaves a partial step directory. Its
`manifest.json` records the sha256 and size of every other file: a checkpoint is only used
after it verifies, and `latest_valid_checkpoint` falls back past corrupt ones. Weights are
safetensors; optimizer and RNG state are loaded with `weights_only=True`; the rest is JSON.
"""

from __future__ import annotations

import pickle
import re
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from nestlearn.train import sharded_checkpoint as sharded
from nestlearn.utils.io import atomic_directory, atomic_write_json, read_json, sha256_file
from nestlearn.utils.seeding import capture_rng_state, restore_rng_state

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
PAYLOAD_FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, TRAINER_STATE_FILE, CONFIG_FILE)
COMMON_FILES = (RNG_FILE, TRAINER_STATE_FILE, CONFIG_FILE)  # rank 0's, in the sharded layout too
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit what it is loaded into."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"checkpoint {path}: {problem}")
        self.path = path


class SavesState(Protocol):
    """What a checkpoint saves of an optimizer: its `state_dict()` (under FSDP, one whose
    sharded tensors were gathered whole, `distributed.full_tensors`)."""

    def state_dict(self) -> dict[str, Any]: ...


def checkpoint_dir_name(step: int) -> str:
    """Zero-padded so that names sort like steps in a file browser."""
    return f"step_{step:06d}"


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: SavesState,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    keep: int = 0,
    extra_tensors: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of `step` atomically, then keep only the `keep` newest (0: all).

    `extra_tensors` (tensors and numbers only, e.g. memory states) come back from
    `load_checkpoint` under the key "extra" of the trainer state, which must not use that key.
    """
    if extra_tensors is not None and "extra" in trainer_state:
        raise ValueError(
            "trainer_state may not contain the key 'extra' when extra_tensors is given"
        )
    final = Path(root) / checkpoint_dir_name(step)
    with atomic_directory(final) as tmp:
        save_model(model, str(tmp / MODEL_FILE))
        opt_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "extra": extra_tensors,
        }
        torch.save(opt_state, tmp / OPTIMIZER_FILE)
        _check_weights_only(tmp / OPTIMIZER_FILE, final)
        torch.save(capture_rng_state(), tmp / RNG_FILE)
        atomic_write_json(tmp / TRAINER_STATE_FILE, trainer_state)
        atomic_write_json(tmp / CONFIG_FILE, config)
        atomic_write_json(tmp / MANIFEST_FILE, manifest(tmp, step))
    prune(root, final, keep)
    return final


def _check_weights_only(file: Path, final: Path) -> None:
    """Fail at save time, not at resume time, if some state would need full unpickling."""
    try:
        torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        culprit = f": {found.group(1)}" if found else ""
        raise CheckpointError(
            final, f"{file.name} holds objects other than tensors and numbers{culprit}"
        ) from exc


def manifest(directory: Path, step: int, world_size: int | None = None) -> dict[str, Any]:
    """The manifest of a checkpoint being written: consolidated, or sharded over `world_size`
    ranks (`sharded_checkpoint`)."""
    names = PAYLOAD_FILES if world_size is None else (*COMMON_FILES, *sharded.rank_files(world_size))
    files = {
        name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
        for name in names
    }
    layout = {} if world_size is None else {"layout": sharded.LAYOUT, "world_size": world_size}
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        **layout,
        "files": files,
    }


def prune(root: Path, just_written: Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints (0: all), once the new one verifies (`_prune`)."""
    if keep > 0:
        _prune(Path(root), just_written, keep)


def _prune(root: Path, just_written: Path, keep: int) -> None:
    """Delete older step dirs beyond the `keep` newest; later steps (another branch) stay.
    Nothing is deleted unless the new checkpoint verifies: rotation never removes the last
    valid checkpoint behind a bad write."""
    try:
        verify_checkpoint(just_written)
    except CheckpointError:
        return
    step = _step_of(just_written)
    older = [p for p in list_checkpoints(root) if p != just_written and _step_of(p) < step]
    for path in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(path)


def _step_of(path: Path) -> int:
    match = _STEP_DIR.fullmatch(path.name)
    if match is None:
        raise CheckpointError(path, "directory name is not step_NNNNNN")
    return int(match.group(1))


def list_checkpoints(root: Path) -> list[Path]:
    """Step directories under `root`, oldest first; hidden temporaries are not checkpoints."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(dirs, key=_step_of)


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Return the manifest if every file is present and matches its recorded hash and size."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "not a directory")
    found = _read_manifest(path)
    files = found.get("files")
    required = _required_files(path, found)
    if not isinstance(files, dict) or not set(required) <= set(files):
        raise CheckpointError(path, f"{MANIFEST_FILE} does not list all of {', '.join(required)}")
    for name, entry in files.items():
        _verify_file(path, name, entry)
    return found


def _required_files(path: Path, found: dict[str, Any]) -> tuple[str, ...]:
    if found.get("layout", "consolidated") == "consolidated":
        return PAYLOAD_FILES
    world = found.get("world_size")
    if found.get("layout") != sharded.LAYOUT or not isinstance(world, int) or world < 1:
        raise CheckpointError(path, f"unknown layout {found.get('layout')!r} or world size {world!r}")
    return (*COMMON_FILES, *sharded.rank_files(world))


def sharded_world_size(path: Path) -> int | None:
    """The world size a sharded checkpoint was written by; None for a consolidated one."""
    found = _read_manifest(path)
    return int(found["world_size"]) if found.get("layout") == sharded.LAYOUT else None


def read_model_state(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """A checkpoint's whole weights under every name `model` gives them (a tied matrix, stored
    once, under each of its names), from either layout."""
    world = sharded_world_size(path)
    state = load_file(str(path / MODEL_FILE)) if world is None else sharded.read_sharded_model(path, world)
    for group in parameter_names(model):
        if (found := next((n for n in group if n in state), None)) is not None:
            state.update({n: state[found] for n in group})
    return state


def parameter_names(model: nn.Module) -> list[list[str]]:
    """Every parameter's names, first name first: more than one for a shared (tied) matrix."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return list(names.values())


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise CheckpointError(path, f"no {MANIFEST_FILE} (incomplete save, or not a checkpoint)")
    try:
        manifest = read_json(file)
    except (OSError, ValueError) as exc:
        raise CheckpointError(path, f"unreadable {MANIFEST_FILE} ({exc})") from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(path, f"{MANIFEST_FILE} is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            path, f"unknown format version {version!r} (this nestlearn reads {FORMAT_VERSION})"
        )
    return manifest


def _verify_file(path: Path, name: str, entry: Any) -> None:
    file = path / name
    if not file.is_file():
        raise CheckpointError(path, f"{name} is missing")
    if not isinstance(entry, dict) or file.stat().st_size != entry.get("bytes"):
        raise CheckpointError(path, f"{name} has the wrong size (truncated or replaced)")
    if sha256_file(file) != entry.get("sha256"):
        raise CheckpointError(path, f"{name} does not match its sha256 (corrupted)")


def latest_valid_checkpoint(root: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies; each newer invalid one is skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            warn(f"skipping invalid {exc}")
            continue
        return path
    return None


def resolve_resume(root: Path, resume: str | None) -> Path | None:
    """Map the `resume` setting to a verified checkpoint directory, or None for a fresh start.

    None / "none": fresh start. "auto": the latest valid checkpoint under `root`, if any.
    Anything else is a path (or a step directory name under `root`) that must verify.
    """
    if resume is None or resume == "none":
        return None
    if resume == "auto":
        return latest_valid_checkpoint(root)
    path = Path(resume)
    if not path.exists() and (Path(root) / resume).exists():
        path = Path(root) / resume
    verify_checkpoint(path)
    return path


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    map_location: str | torch.device = "cpu",
    restore_rng: bool = True,
    weights: Callable[[Path, nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Verify, then restore weights (strictly; by `weights` if given, e.g. into a sharded
    model, else `load_weights`), optimizer, scheduler and RNG states.

    Returns the trainer state, plus "extra" when the checkpoint holds extra tensors.
    """
    path = Path(path)
    verify_checkpoint(path)
    (weights or load_weights)(path, model)
    world = sharded_world_size(path)
    blob = (torch.load(path / OPTIMIZER_FILE, map_location=map_location, weights_only=True) if world is None
            else sharded.read_sharded_blob(path, world))
    if optimizer is not None:
        _load_state(path, "optimizer", optimizer, blob["optimizer"])
    if scheduler is not None:
        if blob["scheduler"] is None:
            raise CheckpointError(path, "holds no scheduler state but a scheduler was given")
        _load_state(path, "scheduler", scheduler, blob["scheduler"])
    if restore_rng:
        restore_rng_state(torch.load(path / RNG_FILE, map_location="cpu", weights_only=True))
    state: dict[str, Any] = read_json(path / TRAINER_STATE_FILE)
    if blob["extra"] is not None:
        state["extra"] = blob["extra"]
    return state


def load_weights(path: Path, model: nn.Module) -> None:
    """Load a checkpoint's weights into `model` strictly (every tensor, no more; a tied head
    once); the checkpoint is not verified here (`verify_checkpoint`)."""
    try:
        if sharded_world_size(path) is None:
            missing, unexpected = load_model(model, path / MODEL_FILE, strict=False)
        else:
            missing, unexpected = model.load_state_dict(read_model_state(path, model), strict=False)
    except RuntimeError as exc:
        raise CheckpointError(path, f"weights do not fit the model: {_one_line(exc)}") from exc
    if missing or unexpected:
        raise CheckpointError(
            path,
            f"weights do not fit the model: missing {_names(missing)}, unexpected {_names(unexpected)}",
        )


def _load_state(path: Path, what: str, target: Any, state: dict[str, Any]) -> None:
    try:
        target.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(path, f"{what} state does not fit: {_one_line(exc)}") from exc


def _names(keys: list[str], limit: int = 5) -> str:
    shown = sorted(keys)[:limit]
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"[{', '.join(shown)}]{more}"


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
