"""Every registered model type trains cleanly at its family's smoke config on a slice of the
default corpus: no non-finite loss at any step, a finite validation loss, a falling loss.

The smoke shapes (width 192, 4 layers, sequences of 256) are kept, because the failures this
guards against live there: before the memory's write bound every Titans variant overflowed in
context on real text within 1-50 steps. The batch is smaller and the run shorter (30 steps of 2 x 256 tokens), for time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from nestlearn import models, pipeline
from nestlearn.config import load_config
from nestlearn.train.metrics import read_jsonl

STEPS = 30
TYPES = [t for t in models.available() if t != "transformer++"]  # an alias of transformer


@pytest.mark.slow
@pytest.mark.parametrize("model_type", TYPES)
def test_model_type_trains_without_a_non_finite_loss(model_type: str, tiny_prepared: Any,
                                                     tmp_path: Path) -> None:
    family = pipeline.FAMILIES[model_type]
    cfg = load_config(f"{family}/pilot_smoke", [
        f"model.type={model_type}", "model.vocab_size=null", f"train.steps={STEPS}",
        "train.batch_size=2", f"train.eval_every={STEPS}", "train.eval_batches=2",
        f"train.ckpt_every={STEPS}", "train.log_every=1", "train.max_bad_steps=1", "logging.progress=none",
        f"out_dir={tmp_path}"])
    messages: list[str] = []
    run_dir, final = pipeline.train(cfg, tiny_prepared, resume=None, log=messages.append)
    assert pipeline.failure(final) is None, final["failed"]
    assert not [m for m in messages if "non-finite" in m], messages
    assert final["step"] == STEPS and math.isfinite(final["val_loss"])
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert all(math.isfinite(x) for x in losses)
    assert len(losses) == STEPS and sum(losses[-5:]) / 5 < losses[0] - 1.0, losses  # from ~ln(vocab)
