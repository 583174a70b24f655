"""Flushing subnormal floats (``utils.numerics``) reaches every intra-op thread; training sets it and
keeps freed memory (``utils.host_memory``) unless told not to."""

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


@pytest.mark.parametrize("switch", ["flush_subnormals", "retain_freed_memory"])
@pytest.mark.parametrize("on", [True, False])
def test_training_sets_process_settings_unless_told_not_to(switch: str, on: bool, tiny_cfg: RunConfig,
                                                           tiny_prepared: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.flush_subnormals`` (``utils.numerics``) and ``train.retain_freed_memory``
    (``utils.host_memory``) each make ``pipeline.train`` call its setter, or not."""
    calls: list[bool] = []
    monkeypatch.setattr(pipeline, switch, lambda: calls.append(True) or True)
    cfg = dataclasses.replace(tiny_cfg, name=f"{switch}_{on}", train=dataclasses.replace(
        tiny_cfg.train, steps=1, eval_every=1, eval_batches=1, ckpt_every=1, **{switch: on}))
    pipeline.train(cfg, tiny_prepared, resume=None, log=lambda _msg: None)
    assert calls == ([True] if on else [])
