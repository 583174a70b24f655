"""Zero-shot scoring: the log-likelihoods equal a direct computation with the model, rolling
windows cover a long text once, and the harness adapter runs local tasks offline (a trained
model beats an untrained one on code it has seen the like of)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from nestlearn import cli, pipeline
from nestlearn.config import RunConfig
from nestlearn.eval.scoring import Scorer, rolling_windows
from nestlearn.generate import generate
from test_generate import Letters, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def direct_logprob(model: Any, ids: list[int], first_scored: int) -> float:
    """log p(ids[first_scored:] | ids[:first_scored]) from one pass over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0][0]
    logp = F.log_softmax(logits, -1)
    return float(sum(logp[i - 1, ids[i]] for i in range(first_scored, len(ids))))


@pytest.mark.parametrize("model_type", ["transformer", "hope", "titans_mac"])
def test_loglikelihood_equals_a_direct_computation(model_type: str) -> None:
    model, codec = tiny(model_type), Letters()
    scorer = Scorer(model, codec, max_length=64)
    pairs = [("abc de", "fgh"), ("abc de ", "xy z"), ("abc de", " q"), ("", "hello")]
    got = scorer.loglikelihood(pairs)
    for (context, continuation), (logp, _) in zip(pairs, got, strict=True):
        stripped = context.rstrip(" ")
        ctx = codec.encode(stripped) if stripped else [codec.eos_id]
        cont = codec.encode(context[len(stripped):] + continuation)
        assert logp == pytest.approx(direct_logprob(model, ctx + cont, len(ctx)), rel=1e-9, abs=1e-9)


def test_greedy_flag_marks_what_greedy_decoding_writes() -> None:
    model, codec = tiny("hope"), Letters()
    greedy = generate(model, codec, "abc", temperature=0, max_new_tokens=4, stop_at_eos=False)
    other = "".join(codec.alphabet[(codec.alphabet.index(c) + 1) % 26] for c in greedy)
    (_, is_greedy), (_, not_greedy) = Scorer(model, codec, 64).loglikelihood([("abc", greedy), ("abc", other)])
    assert is_greedy and not not_greedy


def test_rolling_windows_predict_every_token_once_with_full_context() -> None:
    tokens = list(range(10, 33))  # 23 tokens, window 8
    windows = rolling_windows(tokens, prefix=0, max_length=8)
    assert [t for w in windows for t in w.targets] == tokens
    seq = [0, *tokens]
    for w in windows:
        assert 1 <= len(w.inputs) <= 8
        start = seq.index(w.targets[0])
        assert w.inputs == seq[start + len(w.targets) - 1 - len(w.inputs):start + len(w.targets) - 1]
    assert [len(w.inputs) for w in windows] == [8, 8, 8]  # the last one reads a full window too
    assert rolling_windows([], prefix=0, max_length=8) == []


@pytest.mark.parametrize("model_type", ["transformer", "hope"])
def test_rolling_loglikelihood_of_a_long_text_is_the_sum_over_its_windows(model_type: str) -> None:
    model, codec = tiny(model_type), Letters()
    text = "the quick brown fox jumps over the lazy dog. " * 2  # 90 tokens, windows of 16
    tokens = codec.encode(text)
    expected = 0.0
    for w in rolling_windows(tokens, codec.eos_id, 16):
        ids = w.inputs + w.targets[-1:]
        expected += direct_logprob(model, ids, len(ids) - len(w.targets))
    one, batched = Scorer(model, codec, 16, 1), Scorer(model, codec, 16, 3)
    got = one.loglikelihood_rolling([text, "abc"])
    assert got[0] == pytest.approx(expected, rel=1e-9)
    assert batched.loglikelihood_rolling([text, "abc"]) == pytest.approx(got, rel=1e-9)
    # within one window it is the log-likelihood of the text after the end-of-sequence token
    assert got[1] == pytest.approx(direct_logprob(model, [codec.eos_id, *codec.encode("abc")], 1), rel=1e-9)


def test_generate_until_stops_at_until() -> None:
    model, codec = tiny("hope"), Letters()
    free = generate(model, codec, "abc", temperature=0, max_new_tokens=30, stop_at_eos=False)
    stop = free[6:8]
    out = Scorer(model, codec, 64).generate_until([("abc", {"until": [stop], "max_gen_toks": 30})])
    assert out == [free[:free.index(stop)]]


# -- the harness -----------------------------------------------------------------------------

def code_task(root: Path, sources: Path, tokenizer: Any) -> Path:
    """A local multiple-choice task: which continuation of a line of real Python code is the
    real one, its tokens in order or the same tokens reversed? A model that knows nothing of
    order is at chance (the same pieces, as many of them)."""
    import random

    from nestlearn.eval.zeroshot import local_task_yaml

    rng = random.Random(0)
    rows = []
    for path in sorted(sources.glob("*.py"))[:80]:
        for line in path.read_text(errors="ignore").splitlines():
            if len(line) > 40 and line.isascii():
                cut = len(line) // 2
                real_ids = tokenizer.encode(line[cut:])[:6]
                real, fake = tokenizer.decode(real_ids), tokenizer.decode(real_ids[::-1])
                if fake != real and sorted(tokenizer.encode(fake)) == sorted(real_ids):
                    label = rng.randrange(2)
                    rows.append({"context": line[:cut], "choices": [real, fake] if label == 0 else [fake, real],
                                 "label": label})
                break
    assert len(rows) >= 30, len(rows)
    data = root / "code.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "code.yaml").write_text(local_task_yaml("nl_code_choice", data, "multiple_choice"))
    return root


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.mark.slow
def test_the_harness_scores_a_trained_run_above_an_untrained_one(
        tiny_cfg: RunConfig, tiny_prepared: Any, tmp_path: Path, offline: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lm_eval")
    from nestlearn.data.corpus import stdlib_root
    from nestlearn.eval.report import write_report

    (tmp_path / "tasks").mkdir()
    from nestlearn.data.tokenizer import load_tokenizer

    tasks = code_task(tmp_path / "tasks", stdlib_root(), load_tokenizer(tiny_prepared.tokenizer_path))
    accuracy = {}
    for steps in (1, 150):
        cfg = dataclasses.replace(tiny_cfg, name=f"steps{steps}", train=dataclasses.replace(
            tiny_cfg.train, steps=steps, ckpt_every=steps, eval_every=steps))
        run_dir, _ = pipeline.train(cfg, tiny_prepared, resume=None, log=lambda _: None)
        code = cli.main(["eval", "zeroshot", str(run_dir), "--tasks", "nl_code_choice",
                         "--include-path", str(tasks), "--device", "cpu"])
        assert code == 0
        assert f"results: {run_dir / 'eval' / 'zeroshot.json'}" in capsys.readouterr().out
        blob = json.loads((run_dir / "eval" / "zeroshot.json").read_text())
        assert blob["tasks"] == ["nl_code_choice"] and blob["checkpoint"].endswith(f"step_{steps:06d}")
        assert blob["harness_version"] and blob["config"]["name"] == f"steps{steps}"
        acc = blob["metrics"]["nl_code_choice"]["acc"]
        assert acc["stderr"] is not None and acc["stderr"] > 0
        accuracy[steps] = acc["value"]
        assert "<h2>Zero-shot</h2>" in write_report(run_dir).read_text()
    if importlib.util.find_spec("transformers") is not None:  # an exported run scores the same
        assert cli.main(["export", str(run_dir), "--hf", str(tmp_path / "hf")]) == 0
        assert cli.main(["eval", "zeroshot", str(tmp_path / "hf"), "--tasks", "nl_code_choice",
                         "--include-path", str(tasks), "--device", "cpu"]) == 0
        exported = json.loads((tmp_path / "hf" / "eval" / "zeroshot.json").read_text())
        assert exported["metrics"] == blob["metrics"] and exported["max_length"] == blob["max_length"]
    # the harness's own CLI, with the adapter registered
    harness = subprocess.run([sys.executable, "-m", "nestlearn.eval.zeroshot", "--model", "nestlearn",
                              "--model_args", f"pretrained={run_dir}", "--tasks", "nl_code_choice",
                              "--include_path", str(tasks), "--device", "cpu", "--limit", "5"],
                             capture_output=True, text=True, check=False, timeout=300)
    assert harness.returncode == 0, harness.stderr[-2000:]
    assert "nl_code_choice" in harness.stdout and "acc" in harness.stdout
    assert accuracy[150] >= 0.65 and accuracy[150] > accuracy[1] + 0.15, accuracy  # measured: 0.75, 0.46


def test_an_unknown_task_is_a_one_line_error(tiny_cfg: RunConfig, tiny_prepared: Any, offline: None,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lm_eval")
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, steps=1, ckpt_every=1,
                                                                  eval_every=1))
    run_dir, _ = pipeline.train(cfg, tiny_prepared, resume=None, log=lambda _: None)
    assert cli.main(["eval", "zeroshot", str(run_dir), "--tasks", "no_such_task_xyz"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nestlearn: error: unknown task(s) no_such_task_xyz")


def test_paper_names_the_papers_tasks() -> None:
    pytest.importorskip("lm_eval")
    from nestlearn.eval.zeroshot import PAPER_TASKS, task_list

    assert task_list("paper") == list(PAPER_TASKS)
    assert task_list("piqa, paper") == ["piqa", *[t for t in PAPER_TASKS if t != "piqa"]]
    with pytest.raises(ValueError, match="names no task"):
        task_list(" , ")
