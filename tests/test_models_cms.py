"""Continuum Memory System: config checks, the three forms, the in-context update rule, the
training-time level clocks and ad-hoc level stacking from a Transformer++ checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nestlearn.config import ModelConfig
from nestlearn.config.errors import ConfigError
from nestlearn.config.schema import CMSConfig
from nestlearn.loading import stack_levels_from_transformer
from nestlearn.models import TransformerPP, build
from nestlearn.models.cms import ContinuumMemory, LevelWeights
from nestlearn.models.hope import HopeLM
from nestlearn.models.stacking import freeze_backbone
from nestlearn.optim.level_clock import (
    ChunkedUpdateScheduler,
    apply_level_updates,
    level_parameters,
    setup_optimizers,
)
from nestlearn.train.checkpoint import CheckpointError, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

V, D, L, H = 31, 16, 2, 2




def model_config(type_: str = "hope_attention", **cms: object) -> ModelConfig:
    return ModelConfig(type=type_, vocab_size=V, d_model=D, n_layers=L, n_heads=H,
                       max_seq_len=16, cms=CMSConfig(**cms))  # type: ignore[arg-type]


def make(seed: int = 0, type_: str = "hope_attention", **cms: object) -> HopeLM:
    torch.manual_seed(seed)
    model = build(model_config(type_, **cms))
    assert isinstance(model, HopeLM)
    return model.double()


def ids_of(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- config -----------------------------------------------------------------------------


@pytest.mark.parametrize("cms", [
    {"chunk_sizes": []},
    {"chunk_sizes": [0]},
    {"hidden": 0},
    {"chunk_sizes": [1, 4], "lr": [0.1, 0.1, 0.1]},
    {"lr": [-1.0]},
    {"chunk_sizes": [4, 4], "form": "nested"},
    {"chunk_sizes": [1, 4], "in_context": True},  # a 1-token chunk has no target inside it
    {"chunk_sizes": [2, 5], "in_context": True},  # 5 is not a multiple of 2
    {"chunk_sizes": [2, 6, 8], "in_context": True, "form": "nested"},  # 6 does not divide 8
])
def test_config_rejects(cms: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        model_config(**cms).check("model")


def test_config_accepts_and_broadcasts_lr() -> None:
    cfg = model_config(chunk_sizes=[2, 4, 8], in_context=True, form="nested", lr=[0.5])
    cfg.check("model")
    assert cfg.cms.level_lrs() == [0.5, 0.5, 0.5]
    model_config(chunk_sizes=[2, 6], in_context=True, lr=[0.1, 0.0]).check("model")


# ---- forward ------------------------------------------------------------------------------


def test_one_level_is_a_transformer_mlp() -> None:
    """k = 1: h + SwiGLU(RMSNorm(h)), the Transformer++ MLP sub-layer."""
    torch.manual_seed(0)
    cms = ContinuumMemory(D, 24, CMSConfig(), 1e-6).double()
    h = torch.randn(2, 5, D, dtype=torch.float64)
    level = cms.level_modules()[0]
    torch.testing.assert_close(cms(h), h + level.mlp(level.norm(h)), rtol=0, atol=0)


def test_sequential_chains_and_independent_aggregates() -> None:
    torch.manual_seed(0)
    h = torch.randn(2, 5, D, dtype=torch.float64)
    seq = ContinuumMemory(D, 24, CMSConfig(chunk_sizes=[1, 4]), 1e-6).double()
    a, b = seq.level_modules()
    first = h + a(h)
    torch.testing.assert_close(seq(h), first + b(first))
    ind = ContinuumMemory(D, 24, CMSConfig(chunk_sizes=[1, 4], form="independent"), 1e-6).double()
    assert ind.agg is not None
    torch.testing.assert_close(ind.agg.detach(), torch.full((2,), 0.5, dtype=torch.float64))
    a, b = ind.level_modules()
    torch.testing.assert_close(ind(h), h + 0.5 * a(h) + 0.5 * b(h))
    nested = ContinuumMemory(D, 24, CMSConfig(chunk_sizes=[1, 4], form="nested"), 1e-6).double()
    nested.load_state_dict(seq.state_dict())
    torch.testing.assert_close(nested(h), seq(h))  # the forms differ only in context


def test_per_context_weights_match_the_learned_ones() -> None:
    """Batched per-context weights equal to θ_0 give the learned MLP's output."""
    torch.manual_seed(0)
    cms = ContinuumMemory(D, 24, CMSConfig(chunk_sizes=[2, 4]), 1e-6).double()
    h = torch.randn(3, 5, D, dtype=torch.float64)
    weights = cms.effective_weights(cms.initial_state(3), keep_graph=False)
    assert weights[0][0].shape == (3, 48, D)
    torch.testing.assert_close(cms(h, weights), cms(h), rtol=1e-12, atol=1e-12)


# ---- the in-context update rule (Eq. 71, Eq. 72) -------------------------------------------


def constant_grads(cms: ContinuumMemory, batch: int, value: float) -> list[LevelWeights]:
    return [(torch.full((batch, *lv.mlp.gate_up.weight.shape), value, dtype=torch.float64),
             torch.full((batch, *lv.mlp.w_out.weight.shape), value, dtype=torch.float64))
            for lv in cms.level_modules()]


def test_levels_fire_every_chunk_with_the_summed_gradient() -> None:
    cfg = CMSConfig(chunk_sizes=[2, 6], in_context=True, lr=[0.1, 0.01])
    cms = ContinuumMemory(D, 8, cfg, 1e-6).double()
    state = cms.initial_state(1)
    history = []
    for position in range(2, 14, 2):  # segments of 2 tokens, gradient 1 each
        state = cms.step(state, constant_grads(cms, 1, 1.0), position)
        history.append((float(state.levels[0].delta[0][0, 0, 0]),
                        float(state.levels[1].delta[0][0, 0, 0]),
                        float(state.levels[1].grad[0][0, 0, 0])))
    fast = [h[0] for h in history]
    assert fast == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6])
    slow = [h[1] for h in history]  # fires at 6 and 12 with 3 summed gradients
    assert slow == pytest.approx([0, 0, -0.03, -0.03, -0.03, -0.06])
    assert [h[2] for h in history] == pytest.approx([1, 2, 0, 1, 2, 0])


def test_nested_level_restarts_from_the_init_its_parent_learns() -> None:
    """Eq. 72 (first order): at the slow level's chunk end the fast one restarts from
    Φ - η_slow Σ(fast gradients since the last reset)."""
    cfg = CMSConfig(chunk_sizes=[2, 4], in_context=True, form="nested", lr=[0.1, 0.05])
    cms = ContinuumMemory(D, 8, cfg, 1e-6).double()
    assert cms.parents == [1, None]
    state = cms.initial_state(1)
    state = cms.step(state, constant_grads(cms, 1, 1.0), 2)
    assert float(state.levels[0].delta[0][0, 0, 0]) == pytest.approx(-0.1)
    state = cms.step(state, constant_grads(cms, 1, 1.0), 4)
    fast = state.levels[0]
    assert fast.init is not None and fast.since_reset is not None
    assert float(fast.delta[0][0, 0, 0]) == pytest.approx(-0.05 * 2)  # not -0.2: reset to Φ
    assert float(fast.init[0][0, 0, 0]) == pytest.approx(-0.1)
    assert float(fast.since_reset[0].abs().max()) == 0.0
    assert float(state.levels[1].delta[0][0, 0, 0]) == pytest.approx(-0.05 * 2)


# ---- training-time level clocks ------------------------------------------------------------


def test_levels_partition_every_parameter_once() -> None:
    model = make(chunk_sizes=[1, 4, 16], form="independent")
    levels = model.levels()
    assert set(levels) == {"base", "cms_1", "cms_4", "cms_16"}
    assert model.level_chunk_sizes() == {"base": 1, "cms_1": 1, "cms_4": 4, "cms_16": 16}
    ids = [id(p) for params in levels.values() for p in params]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    level_parameters(model, list(levels))  # the optimiser-side check agrees
    cms4 = {id(p) for p in levels["cms_4"]}
    assert cms4 == {id(p) for b in model.hope_blocks() for p in b.cms.level_modules()[1].parameters()}


def test_levels_step_at_their_frequencies() -> None:
    model = make(chunk_sizes=[1, 3])
    sizes = model.level_chunk_sizes()
    optimizers = setup_optimizers(model, sizes, 0.1, torch.optim.SGD)
    scheduler = ChunkedUpdateScheduler(sizes)
    ids = ids_of(2, 8)
    levels = model.levels()
    for step in range(6):
        before = {name: [p.detach().clone() for p in params] for name, params in levels.items()}
        logits, _ = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        fired = apply_level_updates(optimizers, scheduler, step)
        for name, params in levels.items():
            moved = any(not torch.equal(p, q) for p, q in zip(params, before[name], strict=True))
            assert moved == (name in fired), (step, name)
        assert ("cms_3" in fired) == (step % 3 == 2)
    assert scheduler.get_update_count("cms_3") == 2
    assert scheduler.get_update_count("base") == 6


# ---- ad-hoc level stacking -----------------------------------------------------------------


def transformer_checkpoint(root: Path, d_model: int = D) -> tuple[TransformerPP, Path]:
    """A Transformer++ trained for two steps, saved as a checkpoint."""
    cfg = ModelConfig(type="transformer", vocab_size=V, d_model=d_model, n_layers=L,
                      n_heads=H, max_seq_len=16)
    torch.manual_seed(0)
    model = build(cfg)
    assert isinstance(model, TransformerPP)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = ids_of(4, 9)
    for _ in range(2):
        logits, _ = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    path = save_checkpoint(root, 2, model=model, optimizer=optimizer, scheduler=None,
                           trainer_state={"step": 2}, config={"model": {"type": "transformer"}})
    return model, path


def test_stacked_single_level_equals_the_transformer(tmp_path: Path) -> None:
    transformer, path = transformer_checkpoint(tmp_path)
    ids = ids_of(2, 12)
    expected, _ = transformer.eval()(ids)
    stacked = stack_levels_from_transformer(path, model_config())
    torch.testing.assert_close(stacked.eval()(ids)[0], expected, rtol=0, atol=0)
    # From the run directory too (newest valid checkpoint), and in context with η = 0.
    in_context = stack_levels_from_transformer(
        tmp_path, model_config(chunk_sizes=[4], in_context=True, lr=[0.0])).double()
    torch.testing.assert_close(in_context.eval()(ids)[0], transformer.double()(ids)[0],
                               rtol=1e-12, atol=1e-12)


def test_stacked_independent_copies_start_at_the_transformer(tmp_path: Path) -> None:
    transformer, path = transformer_checkpoint(tmp_path)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # built in float64: the 1/3 weights exact
    try:
        stacked = stack_levels_from_transformer(
            path, model_config(chunk_sizes=[1, 4, 16], form="independent"))
    finally:
        torch.set_default_dtype(default)
    block = stacked.hope_blocks()[1]
    for level in block.cms.level_modules():
        assert torch.equal(level.mlp.w_out.weight, transformer.blocks[1].mlp.w_out.weight.double())
        assert torch.equal(level.norm.weight, transformer.blocks[1].mlp_norm.weight.double())
    ids = ids_of(2, 12)
    torch.testing.assert_close(stacked(ids)[0], transformer.double()(ids)[0],
                               rtol=1e-12, atol=1e-12)


def test_stacking_is_strict(tmp_path: Path) -> None:
    _, path = transformer_checkpoint(tmp_path, d_model=2 * D)
    with pytest.raises(CheckpointError, match="shape"):
        stack_levels_from_transformer(path, model_config())
    with pytest.raises(ValueError, match="hope_attention"):
        stack_levels_from_transformer(path, model_config("hope_attn_titans"))


def test_frozen_backbone_does_not_move(tmp_path: Path) -> None:
    _, path = transformer_checkpoint(tmp_path)
    model = stack_levels_from_transformer(path, model_config(chunk_sizes=[1, 4]))
    trainable = freeze_backbone(model, frozen_levels=[1])
    slow = [p for b in model.hope_blocks() for p in b.cms.level_modules()[1].parameters()]
    fast = [p for b in model.hope_blocks() for p in b.cms.level_modules()[0].parameters()]
    assert {id(p) for p in trainable} == {id(p) for p in fast}
    assert set(model.levels()) == {"cms_1"}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert "embed.weight" in frozen and "blocks.0.attn.qkv.weight" in frozen
    assert all(id(p) in {id(q) for q in model.parameters() if not q.requires_grad} for p in slow)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = ids_of(2, 9)
    before = [p.detach().clone() for p in trainable]
    logits, _ = model(ids[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert all(not torch.equal(p, q) for p, q in zip(trainable, before, strict=True))
