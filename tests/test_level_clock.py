"""Level clocks: firing rule, gradient accumulation, lr scaling, state, checkpoints, presets."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from nestlearn.config.errors import ConfigError
from nestlearn.models.nested_mlp import NestedModel, NestedModelWithSurprise
from nestlearn.optim.level_clock import ChunkedUpdateScheduler, setup_optimizers
from nestlearn.optim.surprise import SurpriseLossComputer
from nestlearn.train.checkpoint import CheckpointError
from nestlearn.train.level_loop import (
    LevelHistory,
    load_level_checkpoint,
    load_level_clock_preset,
    save_level_checkpoint,
    train_loop,
    train_loop_with_surprise,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHUNKS = {"level1_fast": 1, "level2_medium": 3, "level3_slow": 5}


def data(dim: int = 4, batch: int = 6) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Step-indexed synthetic regression batches (float64 for exact comparisons)."""

    def batch_of(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
        return x, torch.sin(x).flip(-1)

    return batch_of


def tiny(seed: int = 0) -> NestedModel:
    torch.manual_seed(seed)
    return NestedModel(4, 8).double()


def test_levels_fire_exactly_at_their_frequencies() -> None:
    sizes = {"a": 1, "b": 3, "c": 7, "d": 64}
    sched = ChunkedUpdateScheduler(sizes)
    n = 50
    fired: dict[str, list[int]] = {k: [] for k in sizes}
    for step in range(n):
        for level in sched.levels_to_update(step):
            sched.mark_updated(level, step)
            fired[level].append(step)
    for level, c in sizes.items():
        assert sched.get_update_count(level) == n // c
        assert fired[level] == list(range(c - 1, n, c))
    stats = sched.get_stats(n - 1)
    assert stats["c"] == {"chunk_size": 7, "update_count": 7, "expected_updates": 7,
                          "last_update_step": 48, "pending_steps": 1, "next_update": 55}
    assert stats["d"]["last_update_step"] == -1 and stats["d"]["next_update"] == 63


def test_scheduler_errors_are_clear() -> None:
    sched = ChunkedUpdateScheduler({"fast": 1})
    with pytest.raises(ValueError, match="unknown level 'slow'; this scheduler has fast"):
        sched.should_update("slow", 0)
    with pytest.raises(ValueError, match="0-indexed"):
        sched.should_update("fast", -1)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="positive int"):
            ChunkedUpdateScheduler({"fast": bad})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="empty"):
        ChunkedUpdateScheduler({})


def test_state_dict_round_trip_through_json() -> None:
    sched = ChunkedUpdateScheduler(CHUNKS)
    for step in range(11):
        for level in sched.levels_to_update(step):
            sched.mark_updated(level, step)
    restored = ChunkedUpdateScheduler(CHUNKS)
    restored.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    assert restored.get_stats(10) == sched.get_stats(10)
    with pytest.raises(ValueError, match="chunk sizes"):
        ChunkedUpdateScheduler({**CHUNKS, "level3_slow": 6}).load_state_dict(sched.state_dict())


def test_setup_optimizers_scales_lr_and_partitions_parameters() -> None:
    model = NestedModelWithSurprise(4, 8)
    opts = setup_optimizers(model, CHUNKS, base_lr=0.3, lr_rule="mean")
    assert {k: o.param_groups[0]["lr"] for k, o in opts.items()} == pytest.approx(
        {"level1_fast": 0.3, "level2_medium": 0.1, "level3_slow": 0.06})
    adam = setup_optimizers(model, CHUNKS, base_lr=0.3, lr_rule="sqrt")  # base_lr √C
    assert {k: o.param_groups[0]["lr"] for k, o in adam.items()} == pytest.approx(
        {"level1_fast": 0.3, "level2_medium": 0.3 * 3**0.5, "level3_slow": 0.3 * 5**0.5})
    owned = [id(p) for o in opts.values() for p in o.param_groups[0]["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())  # each exactly once
    medium = {id(p) for p in opts["level2_medium"].param_groups[0]["params"]}
    assert all(id(p) in medium for p in model.surprise_heads["level2_medium"].parameters())
    for cls in (torch.optim.SGD, torch.optim.AdamW):  # the default: the seed's base_lr / C
        assert setup_optimizers(model, CHUNKS, 0.3, cls)["level3_slow"].param_groups[0]["lr"] == pytest.approx(0.06)
    flat = setup_optimizers(model, CHUNKS, 0.3, torch.optim.SGD, lr_rule="flat", momentum=0.9)
    assert all(o.param_groups[0]["lr"] == 0.3 and o.param_groups[0]["momentum"] == 0.9
               for o in flat.values())


def test_setup_optimizers_finds_levels_by_submodule_name_and_rejects_orphans() -> None:
    plain = nn.Module()
    plain.fast, plain.slow = nn.Linear(2, 2), nn.Linear(2, 2)
    opts = setup_optimizers(plain, {"fast": 1, "slow": 4}, 1.0, lr_rule="mean")
    assert opts["slow"].param_groups[0]["lr"] == 0.25
    plain.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="never update"):
        setup_optimizers(plain, {"fast": 1, "slow": 4}, 1.0)
    with pytest.raises(ValueError, match="missing in model"):
        setup_optimizers(tiny(), {**CHUNKS, "level4": 9}, 1.0)


def test_fast_zero_grad_leaves_slow_accumulation_intact() -> None:
    model = tiny()
    opts = setup_optimizers(model, CHUNKS, 0.1)
    x, y = data()(0)
    torch.autograd.backward(nn.functional.mse_loss(model(x), y))
    once = model.level3_slow.fc1.weight.grad.clone()  # type: ignore[union-attr]
    torch.autograd.backward(nn.functional.mse_loss(model(x), y))
    opts["level1_fast"].zero_grad()
    assert model.level1_fast.fc1.weight.grad is None
    torch.testing.assert_close(model.level3_slow.fc1.weight.grad, 2 * once)


def reference_cms_sgd(model: NestedModel, steps: int, base_lr: float) -> None:
    """Hand-rolled CMS: grads taken with autograd.grad, stored per step, summed per chunk."""
    levels = model.levels()
    pending: dict[str, list[list[torch.Tensor]]] = {k: [] for k in levels}
    batch_of = data()
    for step in range(steps):
        x, y = batch_of(step)
        names = list(levels)
        params = [p for k in names for p in levels[k]]
        grads = torch.autograd.grad(nn.functional.mse_loss(model(x), y), params)
        i = 0
        for k in names:
            pending[k].append(list(grads[i:i + len(levels[k])]))
            i += len(levels[k])
        with torch.no_grad():
            for k in names:
                if (step + 1) % CHUNKS[k] == 0:
                    for j, p in enumerate(levels[k]):
                        p.sub_(base_lr / CHUNKS[k] * torch.stack([g[j] for g in pending[k]]).sum(0))
                    pending[k] = []


def test_slow_level_applies_the_sum_of_its_chunk_gradients() -> None:
    steps, lr = 12, 0.05
    model, reference = tiny(), tiny()
    opts = setup_optimizers(model, CHUNKS, lr, torch.optim.SGD)
    history = train_loop(model, data(), nn.MSELoss(), opts, ChunkedUpdateScheduler(CHUNKS),
                         num_steps=steps, device="cpu", progress="none")
    reference_cms_sgd(reference, steps, lr)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    assert history.update_counts == {k: steps // c for k, c in CHUNKS.items()}
    assert history.fired["level3_slow"] == [4, 9]
    # steps 10 and 11 are accumulated for the slow level but not yet applied
    assert model.level3_slow.fc1.weight.grad is not None
    assert model.level2_medium.fc1.weight.grad is None  # it just fired at step 11


Run = tuple[NestedModelWithSurprise, dict[str, torch.optim.Optimizer], ChunkedUpdateScheduler,
            SurpriseLossComputer]


def make_run(seed: int) -> Run:
    torch.manual_seed(seed)
    model = NestedModelWithSurprise(4, 8).double()
    opts = setup_optimizers(model, CHUNKS, 1e-2, weight_decay=0.01)
    surprise = SurpriseLossComputer({"level1_fast": 0.3, "level2_medium": 0.1}, 10.0)
    return model, opts, ChunkedUpdateScheduler(CHUNKS), surprise


def run(parts: Run, start: int, stop: int) -> LevelHistory:
    model, opts, sched, surprise = parts
    return train_loop_with_surprise(model, data(), nn.MSELoss(), opts, sched, surprise,
                                    num_steps=stop, device="cpu", start_step=start,
                                    compute_surprise_every_n_steps=2, progress="none")


def test_checkpoint_round_trip_resumes_identically(tmp_path: Path) -> None:
    full = run(make_run(0), 0, 12)
    first = make_run(0)
    head = run(first, 0, 7)  # 7 done: level2 holds 1 pending step, level3 holds 2
    ckpt = save_level_checkpoint(model=first[0], optimizers=first[1], scheduler=first[2],
                                 global_step=7, save_path=tmp_path / "step_7")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_7"]  # no temporaries left
    second = make_run(123)
    step = load_level_checkpoint(checkpoint_path=ckpt, model=second[0], optimizers=second[1],
                                 scheduler=second[2])
    assert step == 7
    tail = run(second, step, 12)
    assert head.losses + tail.losses == full.losses
    assert head.aux_losses + tail.aux_losses == full.aux_losses
    assert tail.update_counts == full.update_counts == {"level1_fast": 12, "level2_medium": 4,
                                                        "level3_slow": 2}


def test_corrupt_checkpoint_is_refused(tmp_path: Path) -> None:
    model, opts, sched, _ = make_run(0)
    ckpt = save_level_checkpoint(model, opts, sched, 0, tmp_path / "ck")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CheckpointError, match="sha256"):
        load_level_checkpoint(ckpt, model, opts, sched)


def test_presets_match_the_quick_reference() -> None:
    small, standard, large = (load_level_clock_preset(n) for n in ("small", "standard", "large"))
    assert (small.input_size, small.hidden_size) == (256, 512)
    assert small.chunk_sizes == {"level1_fast": 1, "level2_medium": 8, "level3_slow": 16}
    assert small.surprise_weights == {"level1_fast": 0.1, "level2_medium": 0.05}
    assert (standard.input_size, standard.hidden_size, standard.chunk_sizes["level3_slow"]) == (
        768, 3072, 256)
    assert standard.surprise_weights == {"level1_fast": 0.3, "level2_medium": 0.1}
    assert (large.input_size, large.hidden_size, large.chunk_sizes["level2_medium"]) == (
        1024, 4096, 32)
    assert large.surprise_weights == {"level1_fast": 0.5, "level2_medium": 0.2}
    assert standard.base_lr == 1e-4 and standard.gradient_clip_value == 10.0


GOOD = """input_size: 8
hidden_size: 16
chunk_sizes: {level1_fast: 1, level2_medium: 2, level3_slow: 4}
surprise_weights: {level1_fast: 0.1}
"""


@pytest.mark.parametrize(("edit", "key"), [
    (("hidden_size: 16", "hidden_size: 16\nlearning_rate: 0.1"), "learning_rate"),
    (("level3_slow: 4", "level3_slow: 0"), "chunk_sizes.level3_slow"),
    ((", level3_slow: 4", ""), "chunk_sizes.level3_slow"),
    (("{level1_fast: 0.1}", "{level9: 0.1}"), "surprise_weights.level9"),
    (("input_size: 8\n", ""), "input_size"),
    (("hidden_size: 16", "hidden_size: many"), "hidden_size"),
])
def test_bad_presets_give_a_one_line_error(tmp_path: Path, edit: tuple[str, str],
                                           key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace(*edit))
    with pytest.raises(ConfigError) as info:
        load_level_clock_preset(path)
    assert info.value.key == key and "\n" not in str(info.value) and str(path) in str(info.value)
    ok = tmp_path / "ok.yaml"
    ok.write_text(GOOD)
    assert load_level_clock_preset(ok).chunk_sizes["level3_slow"] == 4
    with pytest.raises(ConfigError, match="one of small, standard, large"):
        load_level_clock_preset("huge")


def test_cms_quickstart_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("cms_quickstart", None)
    import cms_quickstart

    out = tmp_path / "plot.png"
    preset = tmp_path / "tiny.yaml"
    preset.write_text(GOOD)
    history = cms_quickstart.main(["--steps", "16", "--batch-size", "4", "--preset", str(preset),
                                   "--out", str(out)])
    assert out.stat().st_size > 0
    assert history.update_counts == {"level1_fast": 16, "level2_medium": 8, "level3_slow": 4}
