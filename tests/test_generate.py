"""Generation: the state-carrying loop equals recomputing the prefix for every model type,
sampling filters do what they say, stop strings and streaming, and loading a trained run."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from nestlearn import models, pipeline
from nestlearn.config import ModelConfig, RunConfig
from nestlearn.config.schema import SelfRefConfig, TitansConfig
from nestlearn.generate import SamplingConfig, filter_logits, generate, next_token, sample_ids
from nestlearn.loading import load
from nestlearn.models.base import LanguageModel
from nestlearn.train.trainer import Trainer
from nestlearn.utils.seeding import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")

V = 29
TYPES = [t for t in models.available() if t != "transformer++"]  # an alias of transformer


def tiny(model_type: str, seed: int = 0) -> LanguageModel:
    """A small float64 model of `model_type` whose memories' chunks (3 and 2) do not divide
    the prompt, so that generation crosses chunk boundaries mid-way."""
    torch.manual_seed(seed)
    cfg = ModelConfig(type=model_type, vocab_size=V, d_model=16, n_layers=2, n_heads=2, max_seq_len=64,
                      titans=TitansConfig(memory_heads=2, memory_head_dim=8, memory_chunk_size=3),
                      self_ref=SelfRefConfig(memory_chunk_size=3, other_chunk_size=2))
    return models.build(cfg).double().eval()


def prompt_ids(length: int = 7, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("model_type", TYPES)
def test_cached_greedy_generation_equals_recomputing_the_prefix(model_type: str) -> None:
    model = tiny(model_type)
    ids = prompt_ids()
    cached = torch.stack(list(sample_ids(model, ids, SamplingConfig(max_new_tokens=9, temperature=0))), 1)
    seq = ids
    with torch.no_grad():
        for _ in range(9):  # no state: the whole prefix every step
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq[:, ids.shape[1]:])


@pytest.mark.parametrize("model_type", TYPES)
def test_state_after_a_prompt_in_one_call_equals_token_by_token(model_type: str) -> None:
    model = tiny(model_type)
    ids = prompt_ids(length=8)
    nxt = prompt_ids(length=1)
    with torch.no_grad():
        _, whole = model(ids)
        state = None
        for t in range(ids.shape[1]):
            _, state = model(ids[:, t:t + 1], state)
        a, _ = model(nxt, whole)
        b, _ = model(nxt, state)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_filters_keep_the_top_k_and_the_nucleus() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, False, False, False, True]]
    probs = logits.softmax(-1)[0]  # sorted: 0.636, 0.234, 0.086, 0.032, 0.012
    p = float(probs[4] + probs[0]) - 1e-6  # the two most likely just reach it
    assert torch.isfinite(filter_logits(logits, top_p=p)).tolist() == [[True, False, False, False, True]]
    assert torch.isfinite(filter_logits(logits, top_p=float(probs[4]) + 1e-6)).sum() == 2
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [[False] * 4 + [True]]
    assert torch.isfinite(filter_logits(logits)).all()


def test_sampling_is_seeded_and_top_k_one_is_greedy() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    draw = lambda seed: next_token(  # noqa: E731
        logits, SamplingConfig(temperature=1.5, seed=seed), torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1))
    assert any(not torch.equal(draw(1), draw(s)) for s in range(2, 6))
    greedy = logits.argmax(-1)
    assert torch.equal(next_token(logits, SamplingConfig(temperature=0), None), greedy)
    assert torch.equal(next_token(logits, SamplingConfig(temperature=2.0, top_k=1), None), greedy)


@pytest.mark.parametrize("bad", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5},
                                 {"top_k": -2}, {"max_new_tokens": -1}, {"stop": ("",)}])
def test_bad_sampling_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad)) if "stop" not in bad else "stop"):
        SamplingConfig(**bad)


class Letters:
    """A character-level codec over 'a'..'z', '.' and ' ', with '#' as end of sequence."""

    alphabet = "abcdefghijklmnopqrstuvwxyz. #"
    eos_id = alphabet.index("#")

    def encode(self, text: str) -> list[int]:
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[i] for i in ids)


def test_stop_strings_end_the_text_and_streaming_pieces_join_to_it() -> None:
    model, codec = tiny("transformer"), Letters()
    free = generate(model, codec, "abc", temperature=0, max_new_tokens=40, stop_at_eos=False)
    assert len(free) == 40
    stop = free[10:12]
    pieces: list[str] = []
    text = generate(model, codec, "abc", temperature=0, max_new_tokens=40, stop=(stop,),
                    stop_at_eos=False, on_text=pieces.append)
    assert text == free[:free.index(stop)] and "".join(pieces) == text
    eos_model = EndsAtOnce(model, codec.eos_id)
    assert generate(eos_model, codec, "abc", temperature=0, max_new_tokens=5, stop_at_eos=False) == "#" * 5
    assert generate(eos_model, codec, "abc", temperature=0, max_new_tokens=5) == ""


class EndsAtOnce(torch.nn.Module):
    """A model whose most likely next token is always the end of sequence."""

    def __init__(self, inner: LanguageModel, eos_id: int) -> None:
        super().__init__()
        self.inner, self.eos_id = inner, eos_id

    def forward(self, ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        logits, state = self.inner(ids, state)
        return logits.index_add(-1, torch.tensor([self.eos_id]),
                                torch.full((*logits.shape[:-1], 1), 1e3, dtype=logits.dtype)), state


def test_an_empty_prompt_is_refused() -> None:
    with pytest.raises(ValueError, match="prompt"):
        generate(tiny("transformer"), Letters(), "")


def test_load_returns_the_trained_model_and_its_tokenizer(tiny_cfg: RunConfig, tiny_prepared: Any) -> None:
    cfg = pipeline.with_vocab(dataclasses.replace(
        tiny_cfg, train=dataclasses.replace(tiny_cfg.train, steps=6, ckpt_every=3, eval_every=3)), tiny_prepared)
    seed_everything(cfg.seed)
    model = models.build(cfg.model)
    run_dir = pipeline.run_dir_of(cfg)
    Trainer(cfg, model, tiny_prepared, run_dir, resume=None, log=lambda _: None).fit()
    (run_dir / "tokenizer.model").write_bytes(tiny_prepared.tokenizer_path.read_bytes())  # as
    (run_dir / "data_stats.json").write_text(json.dumps(tiny_prepared.stats))  # pipeline.train does
    loaded = load(run_dir)
    assert loaded.checkpoint.name == "step_000006" and loaded.config == cfg
    assert loaded.tokenizer.sha256 == tiny_prepared.tokenizer_sha256
    ids = torch.tensor([loaded.tokenizer.encode("def main():\n    return 0\n")])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids)[0], model(ids)[0], rtol=0, atol=0)
    earlier = load(run_dir / "checkpoints" / "step_000003")
    assert earlier.checkpoint.name == "step_000003"
    with torch.no_grad():
        assert not torch.equal(earlier.model(ids)[0], loaded.model(ids)[0])
    # the tokenizer is found by its hash under the artifacts when the run has no copy
    (run_dir / "tokenizer.model").unlink()
    assert load(run_dir).tokenizer.sha256 == tiny_prepared.tokenizer_sha256


def test_load_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        load(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        load(tmp_path)


def test_cli_sample_is_a_one_line_error_for_a_bad_run_dir(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "nestlearn", "sample", str(tmp_path / "x")],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
