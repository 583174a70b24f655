"""Needle in a haystack (``nestlearn.eval.niah``): prompts of exact lengths with one needle at
the stated depth, RULER's string-match scoring, the greedy reader, and the CLI on a tiny run."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import pytest
import torch
from torch import nn

from nestlearn import cli, pipeline
from nestlearn.config.schema import RunConfig
from nestlearn.data.tokenizer import load_tokenizer
from nestlearn.eval import niah

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def codec(tiny_prepared: Any) -> Any:
    return load_tokenizer(tiny_prepared.tokenizer_path)


def occurrences(seq: list[int], sub: list[int]) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


@pytest.mark.parametrize("task", list(niah.TASKS))
@pytest.mark.parametrize("length", [600, 777, 2048])
def test_prompts_have_the_length_asked_and_one_needle(codec: Any, task: str, length: int) -> None:
    rng = random.Random(0)
    lines = niah.noise_lines() if niah.TASKS[task].haystack == "noise" else niah.corpus_lines()
    for depth in (0.0, 0.3, 1.0):
        ex = niah.make_example(task, length, depth, codec, lines, rng)
        assert len(ex.ids) == length
        assert occurrences(ex.ids, ex.needle) == [ex.needle_at]
        text = codec.decode(ex.ids)
        sentence = niah.NEEDLE.format(kinds=niah.TASKS[task].value, key=ex.key, value=ex.answer)
        assert text.count(sentence) == 1 and text.count(ex.answer) == 1
        assert text.endswith("mentioned in the provided text is") and ex.key in text.split(sentence)[1]


def test_the_needle_sits_at_the_stated_depth(codec: Any) -> None:
    """On the noise haystack every line has the same tokens, so the needle lands within one
    line of depth x the haystack's length; depth 0 is right after the header."""
    header = len(codec.encode(niah.HEADER.format(kind="number")))
    line = len(codec.encode(niah.NOISE)) + 1
    rng = random.Random(1)
    for depth in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        ex = niah.make_example("s_niah_1", 4096, depth, codec, niah.noise_lines(), rng)
        tail = codec.encode("\n") + codec.encode(niah.QUESTION.format(kind="number", key=ex.key))
        room = 4096 - header - len(ex.needle) - len(tail)
        assert abs((ex.needle_at - header) - depth * room) <= line  # a cut last line: one line off
    assert niah.make_example("s_niah_1", 512, 0.0, codec, niah.noise_lines(), rng).needle_at == header


def test_bad_settings_are_refused(codec: Any) -> None:
    with pytest.raises(ValueError, match="depth must be in"):
        niah.make_example("s_niah_1", 512, 1.5, codec, niah.noise_lines(), random.Random(0))
    with pytest.raises(ValueError, match="no room for a haystack"):
        niah.make_example("s_niah_3", 40, 0.5, codec, niah.noise_lines(), random.Random(0))
    with pytest.raises(ValueError, match="unknown NIAH task"):
        niah.NiahSettings(tasks=("s_niah_9",)).check()
    with pytest.raises(ValueError, match="depths must be in"):
        niah.NiahSettings(depths=(0.5, -0.1)).check()


def test_string_match_scoring_and_accuracy_on_hand_made_outputs() -> None:
    assert niah.score(" 4417321.", "4417321") == 1.0
    assert niah.score(" 441732", "4417321") == 0.0  # a prefix is not the answer
    assert niah.score(" 9B2C-ab", "9b2c-AB") == 1.0  # case-insensitive, as RULER
    rows = [{"task": "t", "length": 1024, "depth": 0.5, "correct": c} for c in (1.0, 0.0, 1.0, 1.0)]
    rows += [{"task": "t", "length": 2048, "depth": 0.0, "correct": 0.0}]
    assert niah.accuracy(rows) == {"t": {"1024": {"0.5": 0.75}, "2048": {"0": 0.0}}}


class Scripted(nn.Module):
    """A stand-in model that writes ``script`` after any prompt, counting tokens in its state."""

    def __init__(self, script: list[int], vocab: int, prompt: int) -> None:
        super().__init__()
        self.script, self.vocab, self.prompt = script, vocab, prompt
        self.unused = nn.Parameter(torch.zeros(()))
        self.calls: list[int] = []

    def forward(self, ids: torch.Tensor, state: int | None = None) -> tuple[torch.Tensor, int]:
        seen = (state or 0) + ids.shape[1]
        self.calls.append(ids.shape[1])
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        logits[:, -1, self.script[min(max(seen - self.prompt, 0), len(self.script) - 1)]] = 1.0
        return logits, seen


def test_the_reader_streams_the_prompt_and_stops_at_a_newline(codec: Any) -> None:
    script = codec.encode(" 4417321.\nmore text")
    ex = niah.make_example("s_niah_2", 1000, 0.5, codec, niah.corpus_lines(), random.Random(2))
    model = Scripted(script, 4096, len(ex.ids))
    assert niah.answer(model, codec, ex.ids, max_new_tokens=30, piece=256) == " 4417321."  # type: ignore[arg-type]
    assert max(model.calls[:-1]) <= 256 and sum(model.calls) == len(ex.ids) + len(codec.encode(" 4417321.\n")) - 1


@pytest.mark.slow
def test_the_cli_writes_results_a_heatmap_and_a_report_section(
        tiny_cfg: RunConfig, tiny_prepared: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from nestlearn.eval.report import write_report

    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, steps=2, ckpt_every=2,
                                                                   eval_every=2))
    run_dir, _ = pipeline.train(cfg, tiny_prepared, resume=None, log=lambda _: None)
    code = cli.main(["eval", "niah", str(run_dir), "--tasks", "s_niah_1,s_niah_3", "--lengths", "600,700",
                     "--depths", "0,1", "--samples", "1", "--device", "cpu"])
    assert code == 0
    assert f"results: {run_dir / 'eval' / 'niah.json'}" in capsys.readouterr().out
    blob = json.loads((run_dir / "eval" / "niah.json").read_text())
    assert len(blob["results"]) == 2 * 2 * 2 and blob["model"] == cfg.model.type
    assert set(blob["accuracy"]) == {"s_niah_1", "s_niah_3"} and blob["checkpoint"].endswith("step_000002")
    assert all(r["correct"] in (0.0, 1.0) and len(r["answer"]) in (7, 36) for r in blob["results"])
    if (run_dir / "eval" / "niah.png").exists():
        assert (run_dir / "eval" / "niah.png").read_bytes()[:4] == b"\x89PNG"
    assert "<h2>Needle in a haystack</h2>" in write_report(run_dir).read_text()
    assert cli.main(["eval", "niah", str(run_dir), "--depths", "0,2"]) != 0
    assert "depths must be in [0, 1]" in capsys.readouterr().err
