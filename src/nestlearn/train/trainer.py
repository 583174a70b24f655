"""The single-process training loop.

The Trainer owns the step loop and nothing else: the model, data and optimizer are built
outside and handed in, so the distributed issue can wrap the same loop without touching
models. Everything needed to continue a run exactly lives in its checkpoints.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from nestlearn.config.loader import to_dict
from nestlearn.config.schema import RunConfig
from nestlearn.data import BatchLoader, PreparedData, iter_eval_batches
from nestlearn.eval.perplexity import lm_figures, lm_loss, summed_nats
from nestlearn.models.observe import inner_loop_stats
from nestlearn.optim import ChunkedAdamW, DeepNestedOptimizer, build_optimizer, build_scheduler
from nestlearn.train.activation_checkpoint import apply_activation_checkpointing
from nestlearn.train.checkpoint import (
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from nestlearn.train.cpu_share import CpuShareCheck
from nestlearn.train.distributed import (
    FullState,
    Parallel,
    full_model,
    full_tensors,
    like_param,
    load_sharded_weights,
    optimizer_context,
    quiet,
    save_sharded_checkpoint,
    shard_optimizer_state,
    wrap,
)
from nestlearn.train.metrics import METRICS_FILE, MultiSink, make_sinks
from nestlearn.train.progress import Progress
from nestlearn.utils.device import autocast_context
from nestlearn.utils.io import read_json


class TrainingDiverged(RuntimeError):
    """Raised after `train.max_bad_steps` consecutive non-finite losses when no rollback is left."""


# Settings that change what a checkpoint means; resuming across a change to one is refused.
RESUME_KEYS = ("seed", "data", "model", "optimizer.type", "train.batch_size", "train.seq_len",
               "train.grad_accum")


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings under RESUME_KEYS whose values differ between a checkpoint's config and
    this run's, named down to the changed key (``model.d_model``, not ``model``)."""
    return [name for k in RESUME_KEYS for name in _differences(_lookup(saved, k), _lookup(current, k), k)]


def _differences(a: Any, b: Any, name: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b)) for d in _differences(a.get(key), b.get(key), f"{name}.{key}")]
    return [] if a == b else [name]


@dataclass
class TrainState:
    """The loop's counters; saved as JSON in every checkpoint."""

    step: int = 0
    tokens: int = 0
    bad_steps: int = 0
    train_time_s: float = 0.0
    best_val_loss: float | None = None
    last_val: dict[str, float] = field(default_factory=dict)
    rollbacks: int = 0  # returns to a checkpoint after non-finite losses, each at a lower lr


class Trainer:
    """Step loop with grad accumulation, clipping, autocast, NaN guard, eval and checkpoints."""

    def __init__(self, cfg: RunConfig, model: nn.Module, data: PreparedData, run_dir: Path,
                 *, resume: str | None = None, log: Callable[[str], None] = print,
                 parallel: Parallel | None = None) -> None:
        """`parallel` (`distributed.setup`): this process's place in a DDP/FSDP job; every rank
        builds a Trainer, only rank 0 logs and writes."""
        self.par = parallel or Parallel()
        self.cfg, self.data, self.run_dir = cfg, data, Path(run_dir)
        self.log = log if self.par.is_main else quiet
        self.par.check_batch(cfg.train.batch_size)
        self.device = self.par.device
        self.model = model.to(self.device)
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        self.wrapped = wrap(self.model, self.par)
        self.net = self.wrapped.train_module  # the module a training step calls (DDP's wrapper)
        self.optimizer = build_optimizer(cfg.optimizer, self.model)
        self.scheduler = build_scheduler(cfg.optimizer, self.optimizer, cfg.train.steps)
        self.loader = BatchLoader(data, "train", cfg.train.batch_size, cfg.train.seq_len, cfg.seed)
        # Meta-batches of the explicit-mode nested optimizer: training windows, own stream.
        explicit = cfg.optimizer.type == "nested" and cfg.optimizer.nested_optimizer.mode == "explicit"
        self.meta_loader = (BatchLoader(data, "train", cfg.train.batch_size, cfg.train.seq_len,
                                        cfg.seed + 1) if explicit else None)
        self.state = TrainState()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.losses: list[float] = []  # per-step training loss of this process, for tests/reports
        self.inner_stats: dict[str, float] = {}  # memory/* means of the last observed step
        self.config_dict = to_dict(cfg)
        resumed = self._maybe_resume(resume)
        self._first_step = self.state.step  # self.losses[i] is the loss of step _first_step + 1 + i
        self._rolled_back = False
        self.sinks = self._sinks(self.state.step if resumed else 0)

    def _sinks(self, resume_step: int) -> MultiSink:
        if not self.par.is_main:
            return MultiSink([])
        return make_sinks(self.cfg.logging, self.run_dir, self.cfg.name, self.config_dict, resume_step)

    def _maybe_resume(self, resume: str | None) -> bool:
        """Load the checkpoint ``resume`` names (``checkpoint.resolve_resume``). A fresh start
        (``None``/"none") in a directory that holds a run first moves that run aside, so two
        runs never share one curve or one checkpoint directory; "auto" with checkpoints of which
        none verifies refuses rather than silently starting over."""
        decision = ""  # rank 0 decides, the others follow: "" fresh, "!why" refused, else a path
        if self.par.is_main:
            try:
                found = self._resume_path(resume)
                decision = "" if found is None else str(found)
            except (ValueError, OSError) as exc:
                if not self.par.active:
                    raise
                decision = f"!{exc}"
        decision = self.par.share(decision)
        if decision.startswith("!"):
            raise ValueError(decision[1:])
        if not decision:
            return False
        path = Path(decision)
        self._restore(path)
        self.log(f"resumed from {path} at step {self.state.step}")
        return True

    def _resume_path(self, resume: str | None) -> Path | None:
        if resume is None or resume == "none":
            self._set_aside_previous_run()
            return None
        path = resolve_resume(self.ckpt_root, resume)
        if path is None:
            if found := list_checkpoints(self.ckpt_root):
                raise ValueError(
                    f"none of the {len(found)} checkpoints in {self.ckpt_root} verifies (the newest: "
                    f"{found[-1].name}); --resume none starts the run over, moving them aside")
            return None
        conflicts = resume_conflicts(read_json(path / "config.json"), self.config_dict)
        if conflicts:
            raise ValueError(
                f"cannot resume from {path}: its config differs in {', '.join(conflicts)}; "
                "use another run name (name=...), or --resume none to start over (the old run is moved aside)")
        return path

    def _restore(self, path: Path) -> None:
        """Model, optimizer, scheduler, loop counters, data position and pending level-clock
        gradients as the checkpoint at ``path`` holds them."""
        sharded = self.par.strategy == "fsdp"
        saved = load_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                scheduler=self.scheduler, map_location=self.device,
                                weights=load_sharded_weights if sharded else None)
        if sharded:
            shard_optimizer_state(self.optimizer)
        known = {k: v for k, v in saved.get("train", {}).items() if k in TrainState.__annotations__}
        self.state = TrainState(**known)
        self.loader.load_state_dict(saved["data"])
        pending = saved.get("extra", {}).get("pending_grads", {})
        for name, p in self.model.named_parameters():
            p.grad = like_param(pending[name], p) if name in pending else None
        if self.meta_loader is not None and "meta_data" in saved:
            self.meta_loader.load_state_dict(saved["meta_data"])

    def _roll_back(self) -> None:
        """After ``max_bad_steps`` non-finite losses in a row: back to the newest valid
        checkpoint with the learning rate times ``rollback_lr_factor`` (kept from then on), or
        ``TrainingDiverged`` when ``max_rollbacks`` are spent or there is no checkpoint."""
        cfg = self.cfg.train
        done = self.state.rollbacks
        path = None
        if done < cfg.max_rollbacks:  # rank 0 looks, so that every rank returns to the same one
            newest = latest_valid_checkpoint(self.ckpt_root, warn=self.log) if self.par.is_main else None
            path = Path(shared) if (shared := self.par.share(str(newest or ""))) else None
        if path is None:
            why = (f"after {done} rollbacks" if done >= cfg.max_rollbacks else "and no checkpoint to roll back to")
            raise TrainingDiverged(
                f"{self.state.bad_steps} consecutive non-finite losses at step {self.state.step + 1} {why}; "
                "lower optimizer.lr or enable train.grad_clip")
        failed_at = self.state.step + 1
        self._restore(path)
        self._rolled_back = True
        del self.losses[max(0, self.state.step - self._first_step):]
        self.state.rollbacks = done + 1
        if self.scheduler is not None:  # the schedule's base rates carry the factor from now on
            self.scheduler.base_lrs = [lr * cfg.rollback_lr_factor for lr in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] *= cfg.rollback_lr_factor
        self.sinks.close()  # the curve continues from the checkpoint: later records are dropped
        self.sinks = self._sinks(self.state.step)
        self.log(f"warning: {cfg.max_bad_steps} non-finite losses in a row at step {failed_at}: rolled back "
                 f"to {path.name} with the learning rate x{cfg.rollback_lr_factor ** self.state.rollbacks:g} "
                 f"(rollback {self.state.rollbacks} of {cfg.max_rollbacks})")

    def _set_aside_previous_run(self) -> None:
        """Move a previous run's checkpoints, metrics and config to ``superseded-<UTC time>/``."""
        previous = [self.ckpt_root, self.run_dir / METRICS_FILE, self.run_dir / "metrics.json"]
        held = [p for p in previous if (p.is_dir() and any(p.iterdir())) or (p.is_file() and p.stat().st_size > 0)]
        if not held:
            return
        held += [p for p in (self.run_dir / "config.json",) if p.is_file()]  # what the old run was
        stamp = f"superseded-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
        aside, n = self.run_dir / stamp, 1
        while aside.exists():  # two fresh starts within a second
            n += 1
            aside = self.run_dir / f"{stamp}-{n}"
        aside.mkdir()
        for item in held:
            item.rename(aside / item.name)
        self.log(f"a fresh start in {self.run_dir}: the run it held is moved to {aside}")

    # -- one optimizer step ------------------------------------------------------------
    def _train_step(self) -> tuple[float, float]:
        """Run grad_accum micro-batches and one update; returns (loss, grad norm)."""
        cfg = self.cfg.train
        total = 0.0
        observe = (self.state.step + 1) % cfg.log_every == 0 or self.state.step + 1 == cfg.steps
        for _ in range(cfg.grad_accum):
            x, y = (self.par.rows(t).to(self.device, non_blocking=True) for t in self.loader.next_batch())
            with autocast_context(self.device, cfg.precision):
                logits, model_state = self.net(x)
            if observe:
                self.inner_stats = inner_loop_stats(model_state)
            loss = lm_loss(logits, y)
            torch.autograd.backward(loss / cfg.grad_accum)
            total += float(loss.detach())
        (loss_value,) = self.par.mean([total / cfg.grad_accum])
        # On level clocks only the levels that fire now are clipped (their accumulated chunk).
        owned = (self.optimizer.firing_parameters() if isinstance(self.optimizer, ChunkedAdamW)
                 else self.model.parameters())
        params = [p for p in owned if p.grad is not None]
        # DeepNestedOptimizer clips inside its own step; measure the norm without clipping.
        nested = isinstance(self.optimizer, DeepNestedOptimizer)
        max_norm = math.inf if nested or cfg.grad_clip == 0 else cfg.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self._skip_update()
        else:
            self.state.bad_steps = 0
            with optimizer_context(self.par):
                if isinstance(self.optimizer, DeepNestedOptimizer):
                    self.optimizer.step(loss_value)
                    self._maybe_meta_update()
                else:
                    self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
        return loss_value, grad_norm

    def _skip_update(self) -> None:
        """NaN guard: drop every gradient (a poisoned sum is useless); after max_bad_steps in a
        row, roll back (``_roll_back``)."""
        for p in self.model.parameters():
            p.grad = None
        self.state.bad_steps += 1
        if self.state.bad_steps >= self.cfg.train.max_bad_steps:
            self._roll_back()
            return
        self.log(f"warning: non-finite loss at step {self.state.step + 1}; update skipped")
        if self.scheduler is not None:
            with warnings.catch_warnings():  # the schedule advances even for a skipped update
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()

    def _maybe_meta_update(self) -> None:
        """Explicit-mode DeepNestedOptimizer: a meta-step every meta_update_freq steps.

        The meta-batch comes from its own stream of training windows (never validation data),
        so the reported validation figures stay held out.
        """
        opt = self.optimizer
        assert isinstance(opt, DeepNestedOptimizer)
        n = self.cfg.optimizer.nested_optimizer
        if self.meta_loader is None or opt.global_step % n.meta_update_freq:
            return
        x, y = self.meta_loader.next_batch()
        batch = (x.to(self.device), y.to(self.device))
        # The unroll differentiates through gradients: only the math attention kernel has the
        # double backward that needs.
        with sdpa_kernel([SDPBackend.MATH]):
            opt.meta_update(batch, loss_fn=lambda out, target: lm_loss(out[0], target))

    def _lr(self) -> float:
        if isinstance(self.optimizer, DeepNestedOptimizer):
            return self.optimizer.get_effective_lrs()[0]
        return float(self.optimizer.param_groups[0]["lr"])

    def _optimizer_metrics(self) -> dict[str, float]:
        """The port guide's `nested/*` metrics with the nested optimizer; level firings
        (`levels/<name>_updates`) on level clocks."""
        opt = self.optimizer
        if isinstance(opt, ChunkedAdamW):
            return {f"levels/{g['level']}_updates": float(g["clock"] // g["chunk_size"])
                    for g in opt.param_groups}
        if not isinstance(opt, DeepNestedOptimizer):
            return {}
        return opt.nested_metrics()

    # -- evaluation and checkpoints ---------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Validation figures; under data parallelism each rank scores its rows of every batch
        and the sums are reduced (with one process its rows are the batch, the sum its own)."""
        cfg = self.cfg.train
        batches = iter_eval_batches(self.data, "val", cfg.batch_size, cfg.seq_len,
                                    cfg.eval_batches)
        bpt = float(self.data.stats["bytes_per_token"]["val"])
        nats, tokens = summed_nats(self.model, batches, self.device, cfg.precision,
                                   rows=self.par.rows, idle_forward=self.par.strategy == "fsdp")
        total_nats, total_tokens = self.par.total([nats, tokens])
        return lm_figures(total_nats, total_tokens, bpt)

    def _checkpoint(self) -> None:
        trainer_state: dict[str, Any] = {"train": self.state.__dict__,
                                         "data": self.loader.state_dict()}
        if self.meta_loader is not None:
            trainer_state["meta_data"] = self.meta_loader.state_dict()
        # Slow levels on level clocks hold a half-accumulated chunk in .grad: keep it.
        pending = {name: p.grad.detach().clone() for name, p in self.model.named_parameters() if p.grad is not None}
        if self.cfg.parallel.sharded_checkpoints:  # each rank writes its shards
            save_sharded_checkpoint(self.ckpt_root, self.state.step, par=self.par, model=self.model,
                                    optimizer=self.optimizer, scheduler=self.scheduler, trainer_state=trainer_state,
                                    config=self.config_dict, keep=self.cfg.train.keep_checkpoints, pending=pending)
            return
        pending = full_tensors(pending)
        # Under FSDP every rank gathers the whole state (collectives); rank 0 alone writes it.
        sharded = self.par.strategy == "fsdp"
        model = full_model(self.model, self.wrapped)
        optimizer = FullState(full_tensors(self.optimizer.state_dict())) if sharded else self.optimizer
        if self.par.is_main:
            save_checkpoint(self.ckpt_root, self.state.step, model=model,
                            optimizer=optimizer, scheduler=self.scheduler,
                            trainer_state=trainer_state, config=self.config_dict,
                            keep=self.cfg.train.keep_checkpoints,
                            extra_tensors={"pending_grads": pending} if pending else None)
        self.par.barrier()  # no rank reads a checkpoint before it is complete

    def _log_val(self) -> dict[str, float]:
        val = self.evaluate()
        self.state.last_val = val
        if self.state.best_val_loss is None or val["val_loss"] < self.state.best_val_loss:
            self.state.best_val_loss = val["val_loss"]
        self.sinks.log({"step": self.state.step, "split": "val", **val})
        return val

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to `train.steps`; returns the final figures (also written by the caller)."""
        cfg = self.cfg.train
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        # off a terminal: one line every log_every steps, like metrics.jsonl
        progress = Progress(cfg.steps, self.cfg.logging.progress if self.par.is_main else "none",
                            initial=self.state.step,
                            every_steps=cfg.log_every, every_seconds=0.0)
        self.model.train()
        window: list[float] = []
        busy = CpuShareCheck(torch.get_num_threads() if self.device.type == "cpu" else 0, self.log)
        tick = time.perf_counter()
        try:
            while self.state.step < cfg.steps:
                wall, cpu = time.perf_counter(), time.process_time()
                loss, grad_norm = self._train_step()
                if self._rolled_back:  # back at a checkpoint's step: its steps are trained again
                    self._rolled_back = False
                    window.clear()
                    tick = time.perf_counter()
                    continue
                busy.step_done(time.perf_counter() - wall, time.process_time() - cpu)
                self.state.step += 1
                self.state.tokens += tokens_per_step
                self.losses.append(loss)
                window.append(loss)
                now = time.perf_counter()
                self.state.train_time_s += now - tick
                tick = now
                step = self.state.step
                lr = self._lr()
                tps = self.state.tokens / max(self.state.train_time_s, 1e-9)
                progress.update(step, loss=loss, lr=lr, tokens_per_s=tps)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    self.sinks.log({"step": step, "split": "train", "loss": loss,
                                    "loss_avg": sum(window) / len(window), "lr": lr,
                                    "grad_norm": grad_norm, "tokens": self.state.tokens,
                                    "tokens_per_s": tps, "time": self.state.train_time_s,
                                    **self._optimizer_metrics(), **self.inner_stats})
                    window.clear()
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    val = self._log_val()
                    if self.par.is_main:
                        progress.write(f"step {step}: val_loss {val['val_loss']:.4f} "
                                       f"ppl {val['val_ppl']:.2f} bpb {val['val_bpb']:.4f}")
                if step % cfg.ckpt_every == 0 or step == cfg.steps:
                    self._checkpoint()
                tick = time.perf_counter()
        finally:
            progress.close()
            self.sinks.close()
        if not self.state.last_val:
            self.state.last_val = self.evaluate()  # resumed at the end: figures still reported
        return self.final_metrics()

    def final_metrics(self) -> dict[str, Any]:
        cfg = self.cfg.train
        return {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "train_time_s": self.state.train_time_s,
            "tokens_per_s": self.state.tokens / max(self.state.train_time_s, 1e-9),
            "train_loss_last": self.losses[-1] if self.losses else None,
            "best_val_loss": self.state.best_val_loss,
            "batch_tokens": cfg.batch_size * cfg.seq_len * cfg.grad_accum,
            **self.state.last_val,
        }
