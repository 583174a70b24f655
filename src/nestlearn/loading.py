"""Load a trained model in one call: `nestlearn.load(run_dir)` gives the model with its
weights, its tokenizer and its config, from a run directory (its newest valid checkpoint) or
from one checkpoint directory. Nothing is unpickled: weights are safetensors, the config JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from nestlearn import models
from nestlearn.config.loader import from_dict
from nestlearn.config.schema import ModelConfig, RunConfig
from nestlearn.data.tokenizer import MODEL_FILE as TOKENIZER_FILE
from nestlearn.data.tokenizer import Tokenizer, load_tokenizer
from nestlearn.models.base import LanguageModel
from nestlearn.models.hope import HopeLM
from nestlearn.models.stacking import TRANSFORMER_TYPES, stack_levels
from nestlearn.train.checkpoint import (
    CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    CheckpointError,
    latest_valid_checkpoint,
    load_weights,
    verify_checkpoint,
)
from nestlearn.utils.device import resolve_device
from nestlearn.utils.io import read_json, sha256_file

CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class LoadedModel:
    """A trained model (in eval mode), its tokenizer, its run config and where it came from."""

    model: LanguageModel
    tokenizer: Tokenizer
    config: RunConfig
    checkpoint: Path


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that `path` names: itself, or a run directory's newest valid
    checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a run directory or a checkpoint")
    if (path / MANIFEST_FILE).is_file():
        verify_checkpoint(path)
        return path
    if (path / CHECKPOINTS).is_dir():
        found = latest_valid_checkpoint(path / CHECKPOINTS)
        if found is None:
            raise FileNotFoundError(f"{path / CHECKPOINTS} holds no valid checkpoint")
        return found
    raise FileNotFoundError(f"{path} is neither a run directory (with {CHECKPOINTS}/) nor a "
                            f"checkpoint directory (with {MANIFEST_FILE})")


def checkpoint_run_dir(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/step_N``), if it does."""
    parent = checkpoint.parent
    return parent.parent if parent.name == CHECKPOINTS else None


def find_tokenizer(checkpoint: Path, cfg: RunConfig) -> Tokenizer:
    """The run's tokenizer: the copy in its run directory, else `data.tokenizer.path`, else the
    trained one under `data.artifacts_dir` whose hash the run's data statistics record."""
    run_dir = checkpoint_run_dir(checkpoint)
    if run_dir is not None and (run_dir / TOKENIZER_FILE).is_file():
        return load_tokenizer(run_dir / TOKENIZER_FILE)
    if cfg.data.tokenizer.path is not None and Path(cfg.data.tokenizer.path).exists():
        return load_tokenizer(cfg.data.tokenizer.path)
    stats = run_dir / "data_stats.json" if run_dir is not None else None
    want = read_json(stats).get("tokenizer_sha256") if stats is not None and stats.is_file() else None
    for candidate in sorted((Path(cfg.data.artifacts_dir) / "tokenizer").glob(f"*/{TOKENIZER_FILE}")):
        if want is not None and sha256_file(candidate) == want:
            return load_tokenizer(candidate)
    raise FileNotFoundError(f"no tokenizer for {checkpoint}: expected {TOKENIZER_FILE} in its run "
                            f"directory or one with sha256 {want} under {cfg.data.artifacts_dir}/tokenizer")


def load(path: str | Path, device: str = "cpu",
         dtype: torch.dtype | None = None) -> LoadedModel:
    """Model, tokenizer and config of a run directory (its newest valid checkpoint) or of one
    checkpoint directory; the model is in eval mode on ``device`` (as ``train.device``:
    "auto", "cpu", "cuda", "cuda:N") and ``dtype``, if given."""
    checkpoint = resolve_checkpoint(path)
    cfg = from_dict(read_json(checkpoint / CONFIG_FILE))
    model = models.build(cfg.model)
    load_weights(checkpoint, model)
    model.to(device=resolve_device(device), dtype=dtype).eval()
    tokenizer = find_tokenizer(checkpoint, cfg)
    if tokenizer.vocab_size > model.config.vocab_size:  # type: ignore[operator]
        raise ValueError(f"the tokenizer at {tokenizer.path} has {tokenizer.vocab_size} pieces, "
                         f"more than the model's vocabulary ({model.config.vocab_size})")
    return LoadedModel(model, tokenizer, cfg, checkpoint)


def load_run_or_export(path: str | Path, device: str = "cpu") -> LoadedModel:
    """``load``, or a directory ``nestlearn export --hf`` wrote (its config.json is a
    transformers config of model_type nestlearn; needs the hf extra): what the evaluations take."""
    config = Path(path) / CONFIG_FILE
    if config.is_file() and read_json(config).get("model_type") == "nestlearn":
        from nestlearn.hf.export import load_exported

        return load_exported(path, device)
    return load(path, device=device)


def stack_levels_from_transformer(transformer_checkpoint_dir: Path | str, cfg: ModelConfig) -> HopeLM:
    """The ``hope_attention`` model of `cfg` initialised from a Transformer++ checkpoint
    (``models.stacking.stack_levels``): `transformer_checkpoint_dir` is a verified `step_*`
    directory, or a checkpoint root whose newest valid checkpoint is used."""
    path = Path(transformer_checkpoint_dir)
    if (path / MODEL_FILE).exists():
        verify_checkpoint(path)
    else:
        latest = latest_valid_checkpoint(path)
        if latest is None:
            raise CheckpointError(path, "neither a checkpoint nor a directory of valid checkpoints")
        path = latest
    saved_type = read_json(path / CONFIG_FILE).get("model", {}).get("type")
    if saved_type is not None and saved_type not in TRANSFORMER_TYPES:
        raise CheckpointError(path, f"holds a '{saved_type}' model, not a Transformer++")
    source = load_file(str(path / MODEL_FILE))
    if cfg.type != "hope_attention":
        return stack_levels(source, cfg)  # its one-line refusal
    try:
        return stack_levels(source, cfg)
    except ValueError as exc:
        raise CheckpointError(path, str(exc)) from None

