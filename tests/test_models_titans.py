"""Titans MAC / MAG / MAL / LMM language models: registry, causality, exact streaming,
gradients, MAC's retrieve -> attend -> write order against a hand-written loop, training,
shipped configs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import overfit
from nestlearn.config import ConfigError, ModelConfig, load_config
from nestlearn.config.schema import TitansConfig
from nestlearn.memory import current_memory, mlp_forward
from nestlearn.models import available, build
from nestlearn.models.attention import PrefixAttention
from nestlearn.models.layers import apply_rotary
from nestlearn.models.titans import MACBlock, TitansMAC, TitansStream, memory_config

pytestmark = pytest.mark.usefixtures("one_thread")

V = 50
KINDS = ["titans_mac", "titans_mag", "titans_mal", "titans_lmm"]
# segment 4, memory chunk 3 and window 3: T = 11 ends inside a segment and inside a chunk.
TINY = TitansConfig(memory_heads=2, memory_head_dim=4, memory_chunk_size=3, memory_max_lr=0.5,
                    segment_size=4, window=3, n_persistent=2)




def make(kind: str, seed: int = 0, layers: int = 2, **titans: Any) -> TitansMAC | TitansStream:
    torch.manual_seed(seed)
    cfg = ModelConfig(type=kind, vocab_size=V, d_model=16, n_layers=layers, n_heads=2,
                      max_seq_len=8, tie_embeddings=False, titans=dataclasses.replace(TINY, **titans))
    model = build(cfg)
    assert isinstance(model, TitansMAC | TitansStream)
    return model.double()


def ids_of(batch: int, length: int, seed: int = 1) -> Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_every_variant_is_registered_and_builds() -> None:
    assert set(KINDS) <= set(available())
    for kind in KINDS:
        model = make(kind)
        assert isinstance(model, TitansMAC if kind == "titans_mac" else TitansStream)
        logits, state = model(ids_of(3, 5))
        assert logits.shape == (3, 5, V) and state.pos == 5 and len(state.layers) == 2
    assert not hasattr(make("titans_lmm").blocks[0], "attn_norm")


@pytest.mark.parametrize(("key", "value"), [("memory_heads", 0), ("memory_chunk_size", 0),
                                            ("segment_size", 0), ("window", 0), ("n_persistent", -1),
                                            ("memory_max_lr", 0.0), ("memory_grad_clip", 0.0),
                                            ("memory_conv_kernel", -1), ("memory_expansion", 0.01)])
def test_titans_block_is_validated(key: str, value: object) -> None:
    cfg = ModelConfig(type="titans_mac", vocab_size=V, titans=TitansConfig(**{key: value}))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=f"model.titans.{key}"):
        build(cfg)
    with pytest.raises(ConfigError, match=f"model.titans.{key}"):
        load_config(None, [f"model.titans.{key}={value}"])


def test_titans_pilot_compiles_its_memory_chunks() -> None:
    """The pilot sets ``model.titans.memory_compile``; it reaches every block's memory."""
    cfg = load_config("titans/pilot", [])
    assert cfg.model.titans.memory_compile
    assert memory_config(cfg.model).compile
    assert not memory_config(ModelConfig(type="titans_mac")).compile


@pytest.mark.parametrize("kind", KINDS)
def test_causal_future_token_does_not_change_past(kind: str) -> None:
    model = make(kind)
    ids = ids_of(2, 11)
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    a, _ = model(ids)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def run_in_chunks(model: TitansMAC | TitansStream, ids: Tensor, chunk: int) -> Tensor:
    state: Any = None
    outs = []
    for start in range(0, ids.shape[1], chunk):
        out, state = model(ids[:, start:start + chunk], state)
        outs.append(out)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kind", KINDS)
def test_full_equals_chunked_equals_decode(kind: str) -> None:
    # T = 11 > max_seq_len = 8 also grows the RoPE table mid-sequence in MAG/MAL.
    model = make(kind)
    ids = ids_of(2, 11)
    full, state = model(ids)
    for chunk in (1, 2, 5, 7):  # 1 = token-by-token decoding
        torch.testing.assert_close(run_in_chunks(model, ids, chunk), full, rtol=1e-10, atol=1e-10)
    if kind == "titans_mac":  # the partial segment's h and S keys; the retrieval memory kept
        assert state.layers[0].tokens[0].shape[2] == state.layers[0].retrieved[0].shape[2] == 11 % 4
    elif kind != "titans_lmm":  # the sliding window's cache holds window - 1 tokens
        assert state.layers[0].window is not None and state.layers[0].window[0].shape[2] == 2


@pytest.mark.parametrize("kind", ["titans_mac", "titans_mag"])
def test_state_is_not_mutated_and_can_branch(kind: str) -> None:
    model = make(kind)
    prompt, a, b = ids_of(1, 5, seed=2), ids_of(1, 3, seed=3), ids_of(1, 3, seed=4)
    _, state = model(prompt)
    snapshot = [w.clone() for w in state.layers[0].memory.weights.layers]
    out_a, _ = model(a, state)
    out_b, _ = model(b, state)
    assert all(torch.equal(w, s) for w, s in zip(state.layers[0].memory.weights.layers, snapshot, strict=True))
    torch.testing.assert_close(out_a, model(torch.cat((prompt, a), 1))[0][:, 5:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_b, model(torch.cat((prompt, b), 1))[0][:, 5:], rtol=1e-10, atol=1e-10)


def test_state_mismatch_is_rejected() -> None:
    model = make("titans_mac")
    _, state = model(ids_of(2, 3))
    with pytest.raises(ValueError, match="batch size"):
        model(ids_of(1, 1), state)
    with pytest.raises(ValueError, match="layers"):
        model(ids_of(2, 1), dataclasses.replace(state, layers=state.layers[:1]))


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_every_parameter(kind: str) -> None:
    model = make(kind)
    ids = ids_of(2, 12)
    logits, _ = model(ids[:, :-1])
    F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sliding_window_sees_prefix_and_last_window_tokens_only() -> None:
    torch.manual_seed(0)
    attn = PrefixAttention(8, 2, n_persistent=2).double()
    x = torch.randn(1, 7, 8, dtype=torch.float64)
    cos, sin = torch.ones(9, 2, dtype=torch.float64), torch.zeros(9, 2, dtype=torch.float64)
    empty = x.new_zeros(1, 2, 0, 4)
    y, cache = attn.sliding(x, (empty, empty), cos, sin, window=3)
    changed = x.clone()
    changed[:, 2] += 1.0
    y2, _ = attn.sliding(changed, (empty, empty), cos, sin, window=3)
    torch.testing.assert_close(y[:, :2], y2[:, :2], rtol=0, atol=0)  # before token 2
    assert not torch.allclose(y[:, 2:5], y2[:, 2:5])  # tokens 2, 3, 4 see token 2
    torch.testing.assert_close(y[:, 5:], y2[:, 5:], rtol=0, atol=0)  # out of their window
    assert cache[0].shape == (1, 2, 2, 4)
    assert attn.persistent is not None
    with torch.no_grad():
        attn.persistent.add_(1.0)  # ... and every token sees the persistent prefix
    y3, _ = attn.sliding(x, (empty, empty), cos, sin, window=3)
    assert not torch.isclose(y3, y).any()


def reference_mac(model: TitansMAC, ids: Tensor, write_before_retrieve: bool = False) -> Tensor:
    """One-layer MAC written out per segment from Titans §4.1, Eq. 21-25, with its own
    attention: for S^(t), h_t = M*_{t-1}(q_t); y_t = Attn([P ‖ h_t ‖ S^(t)]) (query j sees P,
    h_{<=j}, S_{<=j}); write y_t; o_t = y_t ⊗ M*(y_t). ``write_before_retrieve`` is the wrong
    order: the memory has seen the segment before it is read."""
    block = model.blocks[0]
    assert isinstance(block, MACBlock)
    memory, attn, persistent = block.memory, block.attn, block.attn.persistent
    assert persistent is not None
    c, seg, n_p, n_heads = memory.config, block.segment_size, block.attn.n_persistent, attn.n_heads
    batch, d = ids.shape[0], model.config.d_model
    state = memory.initial_state(batch)
    cos, sin = model.rope(0, n_p + 2 * seg, ids.device, torch.float64)
    outs = []
    for segment in model.embed(ids).split(seg, dim=1):
        n = segment.shape[1]
        h = block.attn_norm(segment)
        read = memory(h, state)[1] if write_before_retrieve else state
        m_prev, _ = current_memory(read.weights, read.momentum, read.buffer, c.spec(), c.grad_clip,
                                   c.write_bound)
        q_mem = F.normalize(F.silu(block.memory_query(h)).view(batch, n, c.heads, c.head_dim).transpose(1, 2), dim=-1)
        h_t = memory.readout(mlp_forward(m_prev.layers, q_mem, c.spec()), h)  # Eq. 21
        s_tilde = torch.cat([persistent.expand(batch, -1, -1), h_t, h], dim=1)  # Eq. 22
        positions = torch.cat([torch.arange(n_p), n_p + torch.arange(n), n_p + seg + torch.arange(n)])
        q, k, v = (t.view(batch, -1, n_heads, d // n_heads).transpose(1, 2)
                   for t in attn.qkv(s_tilde).split(d, dim=-1))
        q, k = apply_rotary(q, cos[positions], sin[positions]), apply_rotary(k, cos[positions], sin[positions])
        scores = q[:, :, n_p + n:] @ k.transpose(-1, -2) / math.sqrt(d // n_heads)
        j = torch.arange(n)
        causal = j[None, :] <= j[:, None]
        visible = torch.cat([torch.ones(n, n_p, dtype=torch.bool), causal, causal], dim=1)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        y = (weights @ v).transpose(1, 2).reshape(batch, n, d)  # Eq. 23, the segment's rows
        m, state = memory(y, state)  # Eq. 24 (write y_t) and M*(y_t) of Eq. 25
        x = segment + attn.proj(block.gate(y, m))  # Eq. 25, o_t = y_t ⊗ M*(y_t)
        outs.append(x + block.mlp(block.mlp_norm(x)))
    logits: Tensor = model.lm_head(model.norm(torch.cat(outs, dim=1)))
    return logits


def test_mac_retrieves_then_attends_then_writes() -> None:
    model = make("titans_mac", layers=1)
    assert isinstance(model, TitansMAC)
    ids = ids_of(2, 10)  # segments of 4, 4, 2
    logits, _ = model(ids)
    torch.testing.assert_close(logits, reference_mac(model, ids), rtol=1e-10, atol=1e-10)
    wrong = reference_mac(model, ids, write_before_retrieve=True)
    assert not torch.allclose(logits, wrong, rtol=1e-6, atol=1e-6)  # the test can tell


def test_tiny_mac_overfits_a_repeated_sequence() -> None:
    torch.manual_seed(0)
    model = build(ModelConfig(type="titans_mac", vocab_size=V, d_model=32, n_layers=2, n_heads=2,
                              titans=TitansConfig(memory_heads=2, memory_head_dim=8, memory_chunk_size=4,
                                                  segment_size=8, n_persistent=2)))
    ids = ids_of(1, 8, seed=9).repeat(4, 3)  # (4, 24): the same 8 tokens, three times per row
    first, last = overfit(model, ids, steps=60)
    assert first > 3.5  # about ln(50) = 3.9 at init
    assert last < first / 50


@pytest.mark.parametrize("kind", KINDS)
def test_flops_per_token(kind: str) -> None:
    model = make(kind)
    flops = [model.flops_per_token(s) for s in (1, 2, 3, 64, 128)]
    assert 0 < flops[0] < flops[1] < flops[2]  # attention keys and the memory chunk grow ...
    assert flops[3] == flops[4]  # ... up to the segment / window / chunk, then stay
    with pytest.raises(ValueError):
        model.flops_per_token(0)


@pytest.mark.parametrize("size", ["pilot_smoke", "pilot"])
def test_shipped_configs_match_the_transformer_in_size(size: str) -> None:
    titans, transformer = load_config(f"titans/{size}"), load_config(f"transformer/{size}")
    assert titans.model.type == "titans_mac" and titans.data.sources == ["stdlib"]
    assert titans.train == transformer.train and titans.data == transformer.data
    for cfg in (titans, transformer):
        cfg.model.vocab_size = cfg.data.tokenizer.vocab_size
    with torch.device("meta"):
        reference = build(transformer.model).num_params()
        for kind in KINDS:  # LMM has no attention: it takes the default (wider) MLP back
            hidden = None if kind == "titans_lmm" else titans.model.mlp_hidden
            count = build(dataclasses.replace(titans.model, type=kind, mlp_hidden=hidden)).num_params()
            assert abs(count / reference - 1) < 0.1, (kind, count, reference)
