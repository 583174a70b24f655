"""`benchmarks/train_throughput.py`: its FLOP counting and its rounds, on tiny models.

The executed-FLOP count is checked two ways: per op against hand counts, and for a whole
Transformer++ against ``flops_per_token``, an independent analytic formula of the same work.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conftest import load_script


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script("benchmarks/train_throughput.py")


def counted(bench: ModuleType, fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False, custom_mapping=bench.EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


def test_triangular_solve_counts_its_broadcast_batch(bench: ModuleType) -> None:
    a = torch.eye(4).expand(2, 1, 4, 4)  # one system shared by 3 right-hand sides each
    b = torch.randn(2, 3, 4, 5)
    assert counted(bench, lambda: torch.linalg.solve_triangular(a, b, upper=False)) == 2 * 3 * 4**2 * 5


def test_depthwise_convolution_backward_counts_its_groups(bench: ModuleType) -> None:
    x = torch.randn(2, 6, 10, requires_grad=True)
    w = torch.randn(6, 1, 3, requires_grad=True)
    forward = 2 * 2 * 8 * w.numel()  # batch, output positions, weights
    assert counted(bench, lambda: F.conv1d(x, w, groups=6)) == forward
    assert counted(bench, lambda: torch.autograd.backward(F.conv1d(x, w, groups=6).sum())) == 3 * forward


def test_cpu_attention_counts_the_full_score_matrix(bench: ModuleType) -> None:
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    forward = 2 * 2 * 16 * 16 * (8 + 8)
    total = counted(bench, lambda: torch.autograd.backward(F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()))
    assert total == 3 * forward  # forward, then two gradient products per forward product


def test_rounds_ratio_and_executed_flops_of_a_tiny_transformer(bench: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "tt.json"
    tiny = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=128"]
    assert bench.main(["--configs", "default,default:model.n_layers=3", "--overrides", *tiny,
                       "--seq-len", "32", "--batch-size", "2", "--steps", "3", "--warmup", "1",
                       "--matmul-size", "64", "--out", str(out)]) == 0
    first, second = json.loads(out.read_text())["results"]
    assert (first["config"], second["config"]) == ("default", "default:model.n_layers=3")
    assert first["ratio_vs_first"] == 1.0 and second["ratio_vs_first"] > 0
    assert second["params"] > first["params"]
    for row in (first, second):
        # the analytic 6N + attention also counts the norm gains as weights: a tiny overcount
        assert row["executed_flops_per_token"] == pytest.approx(row["flops_per_token"], rel=0.03)


@pytest.mark.parametrize("model", ["default", "hope/pilot_smoke"])
def test_counting_on_fake_tensors_gives_the_eager_count(bench: ModuleType, tmp_path: Path, model: str) -> None:
    tiny = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=128"]
    if model != "default":  # HOPE: chunked self-referential memories, CMS, triangular solves
        tiny += ["model.self_ref.memory_chunk_size=8", "model.self_ref.other_chunk_size=8"]
    counts = []
    for mode in ("eager", "fake"):
        out = tmp_path / f"{mode}.json"
        assert bench.main(["--configs", model, "--overrides", *tiny, "--seq-len", "20", "--batch-size", "2",
                           "--steps", "1", "--warmup", "0", "--matmul-size", "64", "--flop-count", mode,
                           "--out", str(out)]) == 0
        counts.append(json.loads(out.read_text())["results"][0]["executed_flops_per_token"])
    assert counts[0] > 0 and counts[1] == pytest.approx(counts[0], rel=1e-9)


def test_an_unknown_config_is_skipped_and_none_left_fails(bench: ModuleType, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--configs", "no/such_config", "--out", str(tmp_path / "x.json")]) == 2
    assert "skipping no/such_config" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_a_config_with_a_non_finite_loss_is_flagged_not_timed(bench: ModuleType, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The 3-layer config's logits turn NaN from its second step on: it leaves the rounds, the
    table times only the first config, and the script exits 1 naming it."""
    make_trial = bench.make_trial

    def poisoned(*args: object, **kwargs: object) -> object:
        trial = make_trial(*args, **kwargs)
        if trial.cfg.model.n_layers == 3:
            calls = [0]

            def hook(_module: object, _inputs: object, out: torch.Tensor) -> torch.Tensor:
                calls[0] += 1
                return out * float("nan") if calls[0] >= 2 else out

            trial.model.lm_head.register_forward_hook(hook)
        return trial

    monkeypatch.setattr(bench, "make_trial", poisoned)
    out = tmp_path / "tt.json"
    tiny = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=128"]
    assert bench.main(["--configs", "default,default:model.n_layers=3", "--overrides", *tiny,
                       "--seq-len", "32", "--batch-size", "2", "--steps", "3", "--warmup", "1",
                       "--matmul-size", "64", "--flop-count", "off", "--out", str(out)]) == 1
    written = json.loads(out.read_text())
    assert [r["config"] for r in written["results"]] == ["default"]
    assert written["non_finite_loss_at_step"] == {"default:model.n_layers=3": 2}
    assert "default:model.n_layers=3: NOT TIMED, non-finite loss at step 2" in capsys.readouterr().out
