"""Trainer unit behaviour: NaN guard, gradient accumulation, bf16 autocast, schedule."""

from __future__ import annotations

import dataclasses
import math
import shutil
from typing import Any

import pytest
import torch

from nestlearn import models, pipeline
from nestlearn.config import OptimizerConfig, RunConfig
from nestlearn.optim import lr_factor, param_groups
from nestlearn.train.metrics import read_jsonl
from nestlearn.train.trainer import Trainer, TrainingDiverged, resume_conflicts

QUIET = lambda _msg: None  # noqa: E731


def make_trainer(cfg: RunConfig, data: Any, resume: str | None = None, **train: Any) -> Trainer:
    cfg = pipeline.with_vocab(cfg, data)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))
    torch.manual_seed(0)
    return Trainer(cfg, models.build(cfg.model), data, pipeline.run_dir_of(cfg), resume=resume,
                   log=QUIET)


def test_non_finite_loss_skips_the_update_then_fails(tiny_cfg: RunConfig, tiny_prepared: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer(tiny_cfg, tiny_prepared, steps=10, max_bad_steps=3)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    original = trainer.model.forward

    def poisoned(ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        logits, new_state = original(ids, state)
        return logits * float("nan"), new_state

    monkeypatch.setattr(trainer.model, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite losses"):
        trainer.fit()
    after = list(trainer.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_one_bad_step_is_skipped_and_training_goes_on(tiny_cfg: RunConfig, tiny_prepared: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer(tiny_cfg, tiny_prepared, steps=4, eval_every=4, ckpt_every=4)
    original = trainer.model.forward
    calls = {"n": 0}

    def once_bad(ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        calls["n"] += 1
        logits, new_state = original(ids, state)
        return (logits * float("inf") if calls["n"] == 2 else logits), new_state

    monkeypatch.setattr(trainer.model, "forward", once_bad)
    final = trainer.fit()
    assert final["step"] == 4 and math.isfinite(final["val_loss"])
    assert not math.isfinite(trainer.losses[1]) and math.isfinite(trainer.losses[-1])


def poison_calls(trainer: Trainer, monkeypatch: pytest.MonkeyPatch, bad: Any) -> None:
    """The model's n-th forward call returns NaN logits when ``bad(n)``."""
    original, calls = trainer.model.forward, {"n": 0}

    def maybe_bad(ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        calls["n"] += 1
        logits, new_state = original(ids, state)
        return (logits * float("nan") if bad(calls["n"]) else logits), new_state

    monkeypatch.setattr(trainer.model, "forward", maybe_bad)


def test_non_finite_losses_in_a_row_roll_back_at_a_lower_rate(tiny_cfg: RunConfig, tiny_prepared: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer(tiny_cfg, tiny_prepared, steps=8, ckpt_every=2, eval_every=8, log_every=1,
                           max_bad_steps=2)
    poison_calls(trainer, monkeypatch, lambda n: n in (5, 6))  # steps 5 and 6: back to step 4
    final = trainer.fit()
    assert final["step"] == 8 and math.isfinite(final["val_loss"]) and trainer.state.rollbacks == 1
    assert trainer.scheduler is not None and trainer.scheduler.base_lrs[0] == pytest.approx(
        0.5 * trainer.cfg.optimizer.lr)
    assert len(trainer.losses) == 8 and all(math.isfinite(x) for x in trainer.losses)
    steps = [r["step"] for r in read_jsonl(trainer.run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, 9))  # the discarded steps' records are gone from the curve


def test_rollbacks_are_limited(tiny_cfg: RunConfig, tiny_prepared: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer(tiny_cfg, tiny_prepared, steps=8, ckpt_every=2, eval_every=8, max_bad_steps=2,
                           max_rollbacks=2)
    poison_calls(trainer, monkeypatch, lambda n: n > 2)  # every step after the step-2 checkpoint
    with pytest.raises(TrainingDiverged, match="after 2 rollbacks"):
        trainer.fit()
    assert trainer.state.rollbacks == 2


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_grad_accumulation_averages_micro_batches(tiny_cfg: RunConfig, tiny_prepared: Any) -> None:
    """With accumulation the update uses the mean gradient of the micro-batches."""
    trainer = make_trainer(tiny_cfg, tiny_prepared, grad_accum=3, grad_clip=0.0)
    loader_copy = make_trainer(tiny_cfg, tiny_prepared).loader
    model = trainer.model
    reference = [torch.zeros_like(p) for p in model.parameters()]
    for _ in range(3):
        x, y = loader_copy.next_batch()
        model.zero_grad()
        logits, _ = model(x)
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                          y.reshape(-1)).backward()
        for r, p in zip(reference, model.parameters(), strict=True):
            r += p.grad / 3
    model.zero_grad()
    captured: list[torch.Tensor] = []
    trainer.optimizer.step = lambda *a, **k: captured.extend(  # type: ignore[method-assign]
        p.grad.clone() for p in model.parameters())
    trainer._train_step()
    for r, g in zip(reference, captured, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_trains(tiny_cfg: RunConfig, tiny_prepared: Any) -> None:
    trainer = make_trainer(tiny_cfg, tiny_prepared, steps=3, precision="bf16", eval_every=3,
                           ckpt_every=3)
    final = trainer.fit()
    assert math.isfinite(final["val_loss"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_warmup_then_cosine_to_the_floor() -> None:
    cfg = OptimizerConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(10, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(55, 100, cfg) == pytest.approx(0.55)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(500, 100, cfg) == pytest.approx(0.1)


def test_no_weight_decay_on_gains(tiny_cfg: RunConfig, tiny_prepared: Any) -> None:
    model = models.build(pipeline.with_vocab(tiny_cfg, tiny_prepared).model)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"])  # type: ignore[attr-defined]
    assert no_decay["params"] and all(p.dim() == 1 for p in no_decay["params"])  # type: ignore[attr-defined]


def test_resume_conflicts_name_the_changed_keys() -> None:
    saved = {"seed": 0, "model": {"d_model": 64, "cms": {"levels": 2}}, "train": {"batch_size": 8, "steps": 10}}
    current = {"seed": 0, "model": {"d_model": 96, "cms": {"levels": 3}}, "train": {"batch_size": 8, "steps": 99}}
    assert resume_conflicts(saved, current) == ["model.cms.levels", "model.d_model"]  # steps may change


@pytest.mark.parametrize("kind", ["delta_momentum", "dmgd", "m3", "nested"])
def test_every_optimizer_type_trains_and_resumes_exactly(kind: str, tiny_cfg: RunConfig,
                                                         tiny_prepared: Any) -> None:
    extra = {"nested_optimizer": dataclasses.replace(
        tiny_cfg.optimizer.nested_optimizer, momentum_hidden_dim=8, meta_update_freq=3,
        k_unroll=2)}
    cfg = dataclasses.replace(tiny_cfg, optimizer=dataclasses.replace(
        tiny_cfg.optimizer, type=kind, lr=0.003, matrix_lr=0.02, m3_frequency=2, **extra))
    full = make_trainer(cfg, tiny_prepared, steps=6, ckpt_every=3, eval_every=3, log_every=1,
                        keep_checkpoints=0)
    full.fit()
    assert all(math.isfinite(v) for v in full.losses)
    assert full.losses[-1] < full.losses[0]
    other = dataclasses.replace(cfg, name=f"{kind}_resumed")
    run_dir = pipeline.run_dir_of(other) / "checkpoints"
    shutil.copytree(pipeline.run_dir_of(cfg) / "checkpoints" / "step_000003",
                    run_dir / "step_000003")
    resumed = make_trainer(other, tiny_prepared, steps=6, ckpt_every=3, eval_every=3,
                           log_every=1, keep_checkpoints=0, resume="auto")
    resumed.fit()
    assert resumed.losses == full.losses[3:]
    if kind == "nested":
        records = read_jsonl(pipeline.run_dir_of(cfg) / "metrics.jsonl")
        train = [r for r in records if r["split"] == "train"]
        assert {"nested/lr_multiplier_core", "nested/meta_loss",
                "nested/momentum_avg_norm"} <= set(train[-1])
        assert full.scheduler is None
        assert any(r["nested/lr_multiplier_core"] != 1.0 for r in train[3:])


def test_explicit_nested_mode_runs_meta_updates(tiny_cfg: RunConfig, tiny_prepared: Any) -> None:
    nested = dataclasses.replace(tiny_cfg.optimizer.nested_optimizer, mode="explicit",
                                 meta_update_freq=2, k_unroll=1, momentum_hidden_dim=8)
    cfg = dataclasses.replace(tiny_cfg, optimizer=dataclasses.replace(
        tiny_cfg.optimizer, type="nested", nested_optimizer=nested))
    trainer = make_trainer(cfg, tiny_prepared, steps=4, eval_every=4, ckpt_every=4)
    trainer.fit()
    assert trainer.optimizer.last_meta_loss is not None  # type: ignore[attr-defined]


def test_inner_loops_and_level_firings_are_logged(tiny_cfg: RunConfig, tiny_prepared: Any) -> None:
    """Titans memories report θ/η/α/surprise; level clocks report how often each level fired."""
    from nestlearn.config.schema import CMSConfig

    model = dataclasses.replace(tiny_cfg.model, type="hope_attn_titans",
                                cms=CMSConfig(chunk_sizes=[1, 2]))
    cfg = dataclasses.replace(tiny_cfg, model=model, optimizer=dataclasses.replace(
        tiny_cfg.optimizer, type="chunked"))
    trainer = make_trainer(cfg, tiny_prepared, steps=4, log_every=2, eval_every=4, ckpt_every=4)
    trainer.fit()
    train = [r for r in read_jsonl(pipeline.run_dir_of(cfg) / "metrics.jsonl")
             if r["split"] == "train"]
    last = train[-1]
    assert 0.0 < last["memory/theta"] < 1.0 and 0.0 < last["memory/eta"] < 1.0
    assert last["memory/surprise_norm"] > 0.0
    assert last["levels/cms_2_updates"] == 2.0 and last["levels/base_updates"] == 4.0
