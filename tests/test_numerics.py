"""Flushing subnormal floats (``utils.numerics``): every intra-op thread, and training sets it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import pytest

from nestlearn import pipeline
from nestlearn.config import RunConfig

# A subnormal result of a 2-thread elementwise op: both threads' halves must come out zero.
PROBE = """
import torch
from nestlearn.utils.numerics import flush_subnormals
print(int(flush_subnormals()) if {flush} else 1)
torch.set_num_threads(2)
x = torch.full((4_000_000,), 1e-30)
print(int((x * 1e-10 != 0).sum()), int((torch.full((8, 256, 256), 1e-20) @ torch.full((8, 256, 256), 1e-20)
                                         != 0).sum()))
"""


def subnormal_counts(flush: bool) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(flush=flush)], check=True,
                         capture_output=True, text=True).stdout
    return [int(n) for n in out.split()]


def test_flush_subnormals_reaches_every_intra_op_thread() -> None:
    supported, *flushed = subnormal_counts(flush=True)
    if not supported:
        pytest.skip("this CPU has no flush-to-zero mode")
    assert subnormal_counts(flush=False)[1] > 0  # the probe does make subnormals
    assert flushed == [0, 0]


@pytest.mark.parametrize("flush", [True, False])
def test_training_flushes_subnormals_unless_told_not_to(flush: bool, tiny_cfg: RunConfig, tiny_prepared: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(pipeline, "flush_subnormals", lambda: calls.append(True) or True)
    cfg = dataclasses.replace(tiny_cfg, name=f"flush_{flush}", train=dataclasses.replace(
        tiny_cfg.train, steps=1, eval_every=1, eval_batches=1, ckpt_every=1, flush_subnormals=flush))
    pipeline.train(cfg, tiny_prepared, resume=None, log=lambda _msg: None)
    assert calls == ([True] if flush else [])
