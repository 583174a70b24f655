"""The transformers wrappers: save/load keeps the logits and `generate` equals nestlearn's own
loop (feeding one token per step) for every model type, the tokenizer round-trips like
nestlearn's, an exported run loads with the auto classes, and what a recurrent state cannot
do fails with one clear line."""

from __future__ import annotations

import dataclasses
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer

from nestlearn import cli, models, pipeline
from nestlearn.config import ModelConfig, RunConfig
from nestlearn.config.schema import SelfRefConfig, TitansConfig
from nestlearn.data.tokenizer import Tokenizer
from nestlearn.generate import SamplingConfig, sample_ids
from nestlearn.hf import (
    NestlearnCache,
    NestlearnConfig,
    NestlearnForCausalLM,
    NestlearnTokenizer,
    export_run,
)
from nestlearn.hf.export import load_exported
from nestlearn.loading import load
from nestlearn.train.trainer import Trainer
from nestlearn.utils.io import usual_mode
from nestlearn.utils.seeding import seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")

V = 29
TYPES = [t for t in models.available() if t != "transformer++"]  # an alias of transformer
TEXT = "def f(x):\n    return x  # a literal ▁ and ▁▁, é, 漢字, 😀, </s>\n\n\tend  "


def tiny(model_type: str, seed: int = 0) -> NestlearnForCausalLM:
    """A small float64 model of `model_type` whose memories' chunks (3 and 2) do not divide the
    prompt, so that generation crosses chunk boundaries mid-way; no end-of-sequence token, so
    that `generate` never stops early."""
    torch.manual_seed(seed)
    cfg = ModelConfig(type=model_type, vocab_size=V, d_model=16, n_layers=2, n_heads=2, max_seq_len=64,
                      titans=TitansConfig(memory_heads=2, memory_head_dim=8, memory_chunk_size=3),
                      self_ref=SelfRefConfig(memory_chunk_size=3, other_chunk_size=2))
    config = NestlearnConfig.from_model_config(cfg, eos_token_id=None)
    return NestlearnForCausalLM(config).double().eval()


def prompt_ids(length: int = 7, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(3))


def greedy(model: NestlearnForCausalLM, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The new tokens of greedy `model.generate`, checking that the inner model is fed the
    prompt once and then one token per step."""
    fed: list[int] = []
    hook = model.model.register_forward_pre_hook(lambda _, args: fed.append(args[0].shape[1]))
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    finally:
        hook.remove()
    assert fed == [ids.shape[1]] + [1] * (n - 1)  # the prompt once, then one token per step
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("model_type", TYPES)
def test_save_and_auto_load_keep_the_logits(model_type: str, tmp_path: Path) -> None:
    model = tiny(model_type)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, NestlearnForCausalLM) and loaded.dtype == torch.float64
    assert loaded.config.model_config == model.config.model_config
    ids = prompt_ids()
    with torch.no_grad():  # bit-equal weights; the loaded tensors' alignment may pick another
        # vector kernel, whose sums round differently (seen: 7e-17 in HOPE's float64 logits)
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("model_type", TYPES)
def test_generate_equals_nestlearn_sampling_and_feeds_one_token_per_step(model_type: str) -> None:
    model, ids = tiny(model_type), prompt_ids()
    ours = torch.stack(list(sample_ids(model.model, ids, SamplingConfig(max_new_tokens=9, temperature=0))), 1)
    assert torch.equal(greedy(model, ids, 9), ours)


def test_forward_continues_a_cache_and_shifts_labels() -> None:
    model, ids = tiny("hope"), prompt_ids()
    with torch.no_grad():
        whole = model(ids)
        cache = NestlearnCache()
        first = model(ids[:, :3], cache=cache).logits
        rest = model(ids[:, 3:], past_key_values=cache).logits
        assert cache.get_seq_length() == ids.shape[1] and whole.cache.get_seq_length() == ids.shape[1]
        torch.testing.assert_close(torch.cat([first, rest], 1), whole.logits, rtol=1e-10, atol=1e-10)
        labels = ids.clone()
        labels[0, 4] = -100
        loss = model(ids, labels=labels).loss
    expected = torch.nn.functional.cross_entropy(whole.logits[:, :-1].reshape(-1, V),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected.float())  # transformers takes the loss in float32
    model.train()
    assert model(ids).cache is None  # no state kept in training unless asked for


def test_a_generation_continues_from_its_returned_cache() -> None:
    model, ids = tiny("titans_mag"), prompt_ids(batch=1)
    whole = model.generate(ids, max_new_tokens=8, do_sample=False)
    part = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    rest = model.generate(part.sequences, cache=part.cache, max_new_tokens=5, do_sample=False)
    assert torch.equal(rest, whole)


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, ids: m(ids, attention_mask=torch.tensor([[0] + [1] * 6, [1] * 7])), "cannot skip padding"),
    (lambda m, ids: m.generate(ids, attention_mask=torch.tensor([[0] + [1] * 6, [1] * 7]),
                               max_new_tokens=2), "cannot skip padding"),
    (lambda m, ids: m.generate(ids, num_beams=2, max_new_tokens=2), "not beam_search"),
    (lambda m, ids: m.generate(ids, num_beams=2, do_sample=True, max_new_tokens=2), "not beam_sample"),
    (lambda m, ids: m(ids, cache=(None,)), "must be a NestlearnCache"),
    (lambda m, ids: m(ids, output_hidden_states=True), "do not support output_hidden_states"),
])
def test_what_a_recurrent_state_cannot_do_is_refused(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        call(tiny("transformer"), prompt_ids())
    assert "\n" not in str(err.value)


def test_the_config_refuses_values_that_contradict_the_nestlearn_config() -> None:
    cfg = ModelConfig(vocab_size=V, tie_embeddings=False)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        NestlearnConfig.from_model_config(cfg, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"nestlearn\.d_modle"):
        NestlearnConfig(nestlearn={"d_modle": 8})
    with pytest.raises(ValueError, match="from_model_config"):
        NestlearnConfig(nestlearn=cfg)  # type: ignore[arg-type]
    assert NestlearnConfig(nestlearn={"type": "hope"}, vocab_size=V).model_config.vocab_size == V


def test_importing_nestlearn_does_not_import_transformers() -> None:
    code = ("import sys, nestlearn, nestlearn.models, nestlearn.loading, nestlearn.generate, "
            "nestlearn.cli; print('transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=120)
    assert proc.stdout.strip() == "False"


def test_the_tokenizer_round_trips_like_nestlearns(tiny_prepared: Any) -> None:
    ours = Tokenizer(tiny_prepared.tokenizer_path)
    theirs = NestlearnTokenizer(str(tiny_prepared.tokenizer_path))
    ids = ours.encode(TEXT)
    assert theirs(TEXT)["input_ids"] == theirs.encode(TEXT) == ids  # nothing added around the text
    assert theirs.decode(ids) == ours.decode(ids) == TEXT
    assert theirs.decode([*ids, ours.eos_id]) == TEXT + "</s>"
    assert theirs.decode([*ids, ours.eos_id], skip_special_tokens=True) == TEXT
    assert theirs.eos_token_id == ours.eos_id and theirs.vocab_size == ours.vocab_size


def test_an_exported_run_loads_with_the_auto_classes(tiny_cfg: RunConfig, tiny_prepared: Any,
                                                     tmp_path: Path) -> None:
    cfg = pipeline.with_vocab(dataclasses.replace(
        tiny_cfg, train=dataclasses.replace(tiny_cfg.train, steps=2, ckpt_every=2, eval_every=2)), tiny_prepared)
    seed_everything(cfg.seed)
    run_dir = pipeline.run_dir_of(cfg)
    Trainer(cfg, models.build(cfg.model), tiny_prepared, run_dir, resume=None, log=lambda _: None).fit()
    (run_dir / "tokenizer.model").write_bytes(tiny_prepared.tokenizer_path.read_bytes())  # as pipeline.train does
    out = export_run(run_dir, tmp_path / "export" / "hf")
    assert out == tmp_path / "export" / "hf" and [p.name for p in out.parent.iterdir()] == ["hf"]  # no temporary left
    assert cli.main(["export", str(run_dir), "--hf", str(out)]) == 0  # the command replaces it
    assert [p.name for p in out.parent.iterdir()] == ["hf"]
    assert all(stat.S_IMODE(p.stat().st_mode) == usual_mode(0o666) for p in out.iterdir())  # not private
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}

    ours = load(run_dir)
    again = load_exported(out)  # what `nestlearn eval zeroshot HF_DIR` reads
    assert again.config.model == ours.config.model and again.config.train.seq_len == cfg.train.seq_len
    ids0 = torch.tensor([ours.tokenizer.encode(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids0)[0], ours.model(ids0)[0], rtol=0, atol=0)
    assert again.tokenizer.sha256 == ours.tokenizer.sha256
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(tokenizer, NestlearnTokenizer)
    assert tokenizer.encode(TEXT) == ours.tokenizer.encode(TEXT) and tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    ids = tokenizer("def main():\n    return 0\n", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, ours.model(ids["input_ids"])[0], rtol=0, atol=0)
    new = model.generate(**ids, max_new_tokens=6, do_sample=False, eos_token_id=None)  # no early end
    expected = sample_ids(ours.model, ids["input_ids"], SamplingConfig(max_new_tokens=6, temperature=0))
    assert new[0, ids["input_ids"].shape[1]:].tolist() == [int(t) for t in expected]
