"""Shared fixtures: a tiny run config on a slice of the default corpus, prepared once."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from nestlearn.config import RunConfig, load_config

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """A script of the repository (``examples/…``, ``benchmarks/…``) imported as a module,
    named after its file."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's names through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread() -> Iterator[None]:
    """For tiny problems: one thread keeps thread-pool overhead from dominating on busy CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_overrides(root: Path) -> list[str]:
    """A config that trains in seconds: ~400 kB of stdlib code, a 512-piece tokenizer."""
    return [
        f"data.artifacts_dir={root / 'artifacts'}",
        "data.max_chars_per_source=400000",
        "data.tokenizer.vocab_size=512",
        "data.tokenizer.max_sentences=20000",
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "train.batch_size=16",
        "train.seq_len=64",
        "train.steps=200",
        "train.eval_every=100",
        "train.eval_batches=4",
        "train.ckpt_every=100",
        "train.log_every=10",
        "optimizer.warmup_steps=5",
        "optimizer.lr=0.01",
        "logging.progress=none",
        f"out_dir={root / 'runs'}",
        "name=tiny",
    ]


def overfit(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> tuple[float, float]:
    """Next-token loss of `ids` before and after `steps` full-batch AdamW steps on it (lr 1e-2,
    no decay): the "can it memorise a repeated sequence" check every architecture gets."""

    def loss_now() -> torch.Tensor:
        logits, _ = model(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = loss_now().item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_now().backward()
        optimizer.step()
    return first, loss_now().item()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_prepared(tiny_root: Path):  # type: ignore[no-untyped-def]
    from nestlearn import pipeline

    cfg = load_config("transformer/pilot_smoke", tiny_overrides(tiny_root))
    return pipeline.prepare(cfg, log=lambda _: None)


@pytest.fixture
def tiny_cfg(tiny_root: Path, tmp_path: Path) -> RunConfig:
    """The tiny config, sharing the prepared data but with a fresh run directory."""
    return load_config("transformer/pilot_smoke",
                       [*tiny_overrides(tiny_root), f"out_dir={tmp_path / 'runs'}"])
