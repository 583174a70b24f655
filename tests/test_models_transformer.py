"""Transformer++: parameter accounting, the state contract, causality, RoPE, init, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import overfit
from nestlearn.config import ModelConfig
from nestlearn.models import KVCache, TransformerPP, build
from nestlearn.models.layers import RMSNorm, RotaryEmbedding, apply_rotary, swiglu_hidden

V, D, L, H = 50, 16, 2, 2


def make(seed: int = 0, **overrides: object) -> TransformerPP:
    fields: dict[str, object] = {"vocab_size": V, "d_model": D, "n_layers": L, "n_heads": H,
                                 "max_seq_len": 8}
    fields.update(overrides)
    torch.manual_seed(seed)
    model = build(ModelConfig(**fields))  # type: ignore[arg-type]
    assert isinstance(model, TransformerPP)
    return model.double()


def ids_of(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_swiglu_hidden_default() -> None:
    assert swiglu_hidden(16) == 64  # 42.7 -> 64
    assert swiglu_hidden(128) == 352  # 341.3 -> 352
    assert swiglu_hidden(96) == 256  # exactly 256


def test_rms_norm_is_x_over_rms_times_gain() -> None:
    """The fused kernel against the formula, values and gradients, in float64; a bfloat16 input
    is normalised in float32, rounded to bf16, then scaled by the gain."""
    torch.manual_seed(0)
    norm = RMSNorm(D, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, D, dtype=torch.float64, requires_grad=True)

    def formula(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    torch.testing.assert_close(norm(x), formula(x, norm.weight))
    grads = torch.autograd.grad(norm(x).square().sum(), (x, norm.weight))
    expected = torch.autograd.grad(formula(x, norm.weight).square().sum(), (x, norm.weight))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    xb = (x.detach() * 1e3).bfloat16()  # squares of ~1e6: exact in float32
    norm.float()
    unit = torch.ones_like(norm.weight)
    torch.testing.assert_close(norm(xb), formula(xb.float(), unit).bfloat16() * norm.weight)


@pytest.mark.parametrize("tied", [True, False])
def test_param_count_matches_hand_computation(tied: bool) -> None:
    model = make(tie_embeddings=tied)
    hidden = swiglu_hidden(D)
    per_layer = 4 * D * D + 3 * D * hidden + 2 * D  # qkv + proj, gate/up + out, two norms
    body = L * per_layer + D  # + final norm
    embedding = V * D
    head = 0 if tied else V * D
    assert model.num_params() == body + embedding + head
    assert model.num_params(exclude_embeddings=True) == body + head
    report = model.param_report()
    assert report["blocks"] == L * per_layer
    assert report["embed"] == embedding
    assert report.get("lm_head", 0) == head
    assert report["total"] == body + embedding + head
    assert report["non_embedding"] == body + head


def test_mlp_hidden_override() -> None:
    model = make(mlp_hidden=24)
    assert model.blocks[0].mlp.w_out.in_features == 24


def test_tied_weights_share_storage() -> None:
    tied, untied = make(tie_embeddings=True), make(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight


def test_no_biases_anywhere() -> None:
    model = make(tie_embeddings=False)
    assert not [n for n, _ in model.named_parameters() if "bias" in n]
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_logits_shape_and_state() -> None:
    model = make()
    logits, state = model(ids_of(3, 5))
    assert logits.shape == (3, 5, V)
    assert isinstance(state, KVCache) and state.pos == 5
    assert len(state.keys) == L and state.keys[0].shape == (3, H, 5, D // H)


def test_causal_future_token_does_not_change_past() -> None:
    model = make()
    ids = ids_of(2, 9)
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    a, _ = model(ids)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def run_in_chunks(model: TransformerPP, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    state: KVCache | None = None
    outs = []
    for start in range(0, ids.shape[1], chunk):
        out, state = model(ids[:, start:start + chunk], state)
        outs.append(out)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 11, 13])
def test_full_equals_chunked_equals_decode(chunk: int) -> None:
    # T = 11 > max_seq_len = 8 also exercises growing the RoPE table mid-sequence.
    model = make()
    ids = ids_of(2, 11)
    full, _ = model(ids)
    torch.testing.assert_close(run_in_chunks(model, ids, chunk), full, rtol=1e-12, atol=1e-12)


def test_state_is_not_mutated_and_can_branch() -> None:
    model = make()
    prompt, a, b = ids_of(1, 4, seed=2), ids_of(1, 3, seed=3), ids_of(1, 3, seed=4)
    _, state = model(prompt)
    snapshot = [k.clone() for k in state.keys]
    out_a, state_a = model(a, state)
    out_b, _ = model(b, state)
    assert state.pos == 4 and state_a.pos == 7
    assert all(torch.equal(k, s) for k, s in zip(state.keys, snapshot, strict=True))
    torch.testing.assert_close(out_a, model(torch.cat((prompt, a), 1))[0][:, 4:])
    torch.testing.assert_close(out_b, model(torch.cat((prompt, b), 1))[0][:, 4:])


def test_state_mismatch_is_rejected() -> None:
    model = make()
    _, state = model(ids_of(2, 3))
    with pytest.raises(ValueError, match="batch size"):
        model(ids_of(1, 1), state)
    with pytest.raises(ValueError, match="layers"):
        model(ids_of(2, 1), KVCache(state.keys[:1], state.values[:1], state.pos))


def test_rope_scores_depend_only_on_relative_position() -> None:
    rope = RotaryEmbedding(head_dim=8, theta=10_000.0, max_seq_len=4)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 8, generator=gen, dtype=torch.float64)  # (T=1, head_dim) each

    def score(m: int, n: int) -> torch.Tensor:
        cos_m, sin_m = rope(m, 1, q.device, q.dtype)
        cos_n, sin_n = rope(n, 1, q.device, q.dtype)
        return (apply_rotary(q, cos_m, sin_m) * apply_rotary(k, cos_n, sin_n)).sum()

    for m, n, shift in [(3, 1, 5), (0, 2, 17), (7, 7, 100)]:
        torch.testing.assert_close(score(m, n), score(m + shift, n + shift), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(score(3, 1), score(3, 2))
    # Rotation preserves norms, and position 0 is the identity.
    cos, sin = rope(5, 1, q.device, q.dtype)
    torch.testing.assert_close(apply_rotary(q, cos, sin).norm(), q.norm())
    cos, sin = rope(0, 1, q.device, q.dtype)
    torch.testing.assert_close(apply_rotary(q, cos, sin), q)


def test_gradient_reaches_every_parameter() -> None:
    model = make(tie_embeddings=False)
    ids = ids_of(2, 6)
    logits, _ = model(ids[:, :-1])
    F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_init_is_deterministic_and_scaled() -> None:
    a, b, c = make(seed=5), make(seed=5), make(seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.embed.weight, c.embed.weight)
    wide = make(d_model=64, n_layers=4, n_heads=2, vocab_size=512)
    std = wide.config.init_std
    assert wide.embed.weight.std().item() == pytest.approx(std, rel=0.1)
    assert wide.blocks[0].attn.qkv.weight.std().item() == pytest.approx(std, rel=0.1)
    residual = std / math.sqrt(2 * 4)
    assert wide.blocks[0].mlp.w_out.weight.std().item() == pytest.approx(residual, rel=0.1)
    assert torch.equal(wide.norm.weight, torch.ones(64, dtype=torch.float64))


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_formula(tied: bool) -> None:
    model = make(tie_embeddings=tied)
    matmul_params = model.num_params(exclude_embeddings=True) + (V * D if tied else 0)
    assert model.flops_per_token(1) == 6 * matmul_params + 12 * L * D
    assert model.flops_per_token(64) - model.flops_per_token(32) == 12 * L * D * 32
    assert model.flops_per_token(1) > 0
    with pytest.raises(ValueError):
        model.flops_per_token(0)


def test_overfits_a_repeated_sequence() -> None:
    torch.manual_seed(0)
    model = build(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2))
    pattern = ids_of(1, 8, seed=9)
    ids = pattern.repeat(4, 3)  # (4, 24): the same 8 tokens, three times per row
    first, last = overfit(model, ids, steps=100)
    assert first > 3.5  # about ln(50) = 3.9 at init
    assert last < first / 100
