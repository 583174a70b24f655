"""The main job: data → tokenizer → shards → model → train → evaluate → report.

Each stage is a function the CLI calls; `run` chains them. Nothing here parses arguments.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nestlearn import models
from nestlearn.config.loader import load_config, to_dict
from nestlearn.config.schema import RunConfig
from nestlearn.data import PreparedData, prepare_data
from nestlearn.data.tokenizer import MODEL_FILE as TOKENIZER_FILE
from nestlearn.eval.report import SAMPLES_FILE, write_report
from nestlearn.generate import SamplingConfig, generate
from nestlearn.loading import load
from nestlearn.train import distributed
from nestlearn.train.trainer import Trainer, TrainingDiverged
from nestlearn.utils.host_memory import retain_freed_memory
from nestlearn.utils.io import atomic_write_bytes, atomic_write_json
from nestlearn.utils.numerics import flush_subnormals
from nestlearn.utils.seeding import seed_everything

Log = Callable[[str], None]


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / cfg.name


def prepare(cfg: RunConfig, log: Log = print) -> PreparedData:
    """Prepare (or reuse) the tokenizer and shards of `cfg.data`; under `torchrun`, rank 0 first,
    then the others reuse what it wrote."""
    par = distributed.setup(cfg)
    progress = cfg.logging.progress != "none" and par.is_main
    with par.main_first():
        return prepare_data(cfg.data, progress=progress, log=log if par.is_main else distributed.quiet)


def with_vocab(cfg: RunConfig, data: PreparedData) -> RunConfig:
    """The config with `model.vocab_size` filled from the tokenizer (or checked against it)."""
    vocab = cfg.model.vocab_size
    if vocab is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=data.vocab_size))
    if vocab < data.vocab_size:
        raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary "
                         f"({data.vocab_size}); leave it null to take the tokenizer's")
    return cfg


def failure(final: dict[str, Any]) -> str | None:
    """Why a run failed (its metrics' `failed`), or None for a run that trained cleanly."""
    reason = final.get("failed")
    return str(reason) if reason else None


def train(cfg: RunConfig, data: PreparedData, resume: str | None = "auto",
          log: Log = print) -> tuple[Path, dict[str, Any]]:
    """Train `cfg.model` on `data`; writes config.json, metrics and checkpoints in the run dir.

    A run that diverges, or ends with a non-finite validation loss, still writes metrics.json,
    with `failed` saying why (`failure`), so that a comparison goes on and reports it."""
    cfg = with_vocab(cfg, data)
    if cfg.train.flush_subnormals:  # first: the thread pool inherits it when it starts
        flush_subnormals()
    if cfg.train.retain_freed_memory:
        retain_freed_memory()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    par = distributed.setup(cfg)  # an unusable device fails before the run directory exists
    if not par.is_main:
        log = distributed.quiet
    model = models.build(cfg.model)
    run_dir = run_dir_of(cfg)
    if par.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    # Before anything is written: a refused resume leaves the run directory as it was.
    trainer = Trainer(cfg, model, data, run_dir, resume=resume, log=log, parallel=par)
    if par.is_main:
        atomic_write_json(run_dir / "config.json", to_dict(cfg))
        atomic_write_json(run_dir / "data_stats.json", data.stats)
        # the run directory carries its tokenizer, so that `nestlearn.load` needs nothing else
        atomic_write_bytes(run_dir / TOKENIZER_FILE, data.tokenizer_path.read_bytes())
    log(f"model {cfg.model.type}: {model.num_params():,} parameters "
        f"({model.num_params(exclude_embeddings=True):,} without embeddings)")
    try:
        final = trainer.fit()
    except TrainingDiverged as exc:
        final = {**trainer.final_metrics(), "failed": str(exc)}
    else:
        if not math.isfinite(final["val_loss"]):
            final["failed"] = f"the final validation loss is {final['val_loss']}"
    final["params"] = model.num_params()
    final["unigram_entropy_nats"] = data.stats.get("unigram_entropy_nats")
    if par.is_main:
        atomic_write_json(run_dir / "metrics.json", final)
    return run_dir, final


SAMPLE_PROMPTS = ("\n", "def ", "class ")
SAMPLING = SamplingConfig(max_new_tokens=100, temperature=0.8, top_p=0.95, seed=0)


def write_samples(run_dir: Path, device: str = "cpu") -> Path:
    """A few texts the run's model writes (`samples.json`, shown in its report): what a loss
    figure cannot say, e.g. whether the model closes its brackets."""
    loaded = load(run_dir, device=device)
    samples = [{"prompt": p, "text": generate(loaded.model, loaded.tokenizer, p, SAMPLING)}
               for p in SAMPLE_PROMPTS]
    path = run_dir / SAMPLES_FILE
    atomic_write_json(path, {"checkpoint": str(loaded.checkpoint), "samples": samples,
                             "sampling": {k: v for k, v in dataclasses.asdict(SAMPLING).items()
                                          if k in ("max_new_tokens", "temperature", "top_p", "seed")}})
    return path


# Config family of each model type, for `--compare TYPE`: TYPE is trained with the config of
# its family at the main config's scale (e.g. hope/pilot_smoke -> titans/pilot_smoke).
FAMILIES = {"transformer": "transformer", "transformer++": "transformer", "hope": "hope",
            "hope_attention": "hope", "hope_attn_titans": "hope", "titans_mac": "titans",
            "titans_mag": "titans", "titans_mal": "titans", "titans_lmm": "titans"}


def comparison_configs(cfg: RunConfig, config_name: str, entries: list[str],
                       overrides: list[str], config_dir: Path | None = None) -> list[RunConfig]:
    """Configs of the `--compare` runs: each entry is a config name (`titans/pilot_smoke`) or a
    model type (`titans_mac`, trained with its family's config at the main config's scale); all
    get the main run's data, seed and training budget, so the curves are comparable."""
    scale = Path(config_name).name
    configs = []
    for entry in entries:
        if "/" in entry:
            other = load_config(entry, overrides, config_dir)
        elif entry in FAMILIES:
            other = load_config(f"{FAMILIES[entry]}/{scale}", [*overrides, f"model.type={entry}"],
                                config_dir)
        else:
            known = ", ".join(sorted(FAMILIES))
            raise ValueError(f"--compare entry {entry!r} is neither a config name (family/name) "
                             f"nor a model type ({known})")
        name = f"{cfg.name}__{entry.replace('/', '_')}"
        configs.append(dataclasses.replace(other, name=name, seed=cfg.seed, out_dir=cfg.out_dir,
                                           data=cfg.data, train=cfg.train, logging=cfg.logging))
    return configs


def run(cfg: RunConfig, resume: str | None = "auto", log: Log = print,
        compare: list[RunConfig] | None = None) -> tuple[Path, list[str]]:
    """The whole main job; returns the path of the report and one line per failed run.

    `compare`: more configs trained on the same prepared data (see `comparison_configs`),
    shown side by side in the main run's report.
    """
    data = prepare(cfg, log)
    main = distributed.setup(cfg).is_main  # under torchrun, rank 0 alone writes samples and reports
    run_dir, final = train(cfg, data, resume, log)
    failures = []
    if (reason := failure(final)) is not None:
        failures.append(f"{cfg.name} ({reason})")
    elif main:
        log(f"validation: loss {final['val_loss']:.4f} nats/token, ppl {final['val_ppl']:.2f}, "
            f"{final['val_bpb']:.4f} bits/byte (unigram entropy "
            f"{final['unigram_entropy_nats']:.4f} nats/token)")
        log(f"samples: {write_samples(run_dir, cfg.train.device)}")
    others = []
    for other in compare or []:
        log(f"comparison run {other.name} ({other.model.type})")
        other_dir, other_final = train(other, data, resume, log)
        if (reason := failure(other_final)) is not None:
            failures.append(f"{other.name} ({reason})")
            log(f"{other.name}: FAILED: {reason}")
        else:
            log(f"{other.name}: val loss {other_final['val_loss']:.4f}")
        if main:
            write_report(other_dir)
        others.append(other_dir)
    return (write_report(run_dir, others) if main else run_dir / "report.html"), failures
