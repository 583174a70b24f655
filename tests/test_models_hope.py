"""Hope language models: the state contract (causality, exact streaming, branching), gradients,
training, and in-context CMS (no leakage, meta-learning through the updates, it helps)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nestlearn.config import ConfigError, ModelConfig, load_config
from nestlearn.config.schema import CMSConfig, SelfRefConfig, TitansConfig
from nestlearn.memory import chunked
from nestlearn.models import available, build
from nestlearn.models.hope import HopeLM, self_ref_config

pytestmark = pytest.mark.usefixtures("one_thread")

V, D, L, H = 31, 16, 2, 2
TYPES = ("hope", "hope_attention", "hope_attn_titans")
CMS_VARIANTS = {
    "static": {"chunk_sizes": [1, 4]},
    "in_context": {"chunk_sizes": [2, 4], "in_context": True, "lr": [0.5]},
    "nested": {"chunk_sizes": [2, 4, 8], "in_context": True, "form": "nested",
               "lr": [0.5, 0.3, 0.1]},
    "independent": {"chunk_sizes": [2, 6], "in_context": True, "form": "independent",
                    "lr": [0.5]},
}




def model_config(type_: str = "hope_attention", n_layers: int = L, **cms: object) -> ModelConfig:
    titans = TitansConfig(memory_heads=2, memory_head_dim=8, memory_chunk_size=3)
    self_ref = SelfRefConfig(memory_chunk_size=3, other_chunk_size=2)
    return ModelConfig(type=type_, vocab_size=V, d_model=D, n_layers=n_layers, n_heads=H,
                       max_seq_len=16, titans=titans, self_ref=self_ref,
                       cms=CMSConfig(**cms))  # type: ignore[arg-type]


def make(type_: str = "hope_attention", seed: int = 0, n_layers: int = L,
         **cms: object) -> HopeLM:
    torch.manual_seed(seed)
    model = build(model_config(type_, n_layers, **cms))
    assert isinstance(model, HopeLM)
    return model.double()


def ids_of(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_in_pieces(model: HopeLM, ids: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    state = None
    outs = []
    for a, b in zip([0, *cuts], [*cuts, ids.shape[1]], strict=True):
        out, state = model(ids[:, a:b], state)
        outs.append(out)
    return torch.cat(outs, dim=1)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_hope_reports_its_inner_loops() -> None:
    from nestlearn.models.observe import inner_loop_stats

    _, state = make("hope")(ids_of(2, 13))
    stats = inner_loop_stats(state)
    assert 0 < stats["memory/theta"] < 1 and 0 < stats["memory/alpha"] < 1
    assert stats["memory/surprise_norm"] > 0


def test_registered() -> None:
    assert set(TYPES) <= set(available())
    assert make("hope_attn_titans").hope_blocks()[0].memory is not None
    hope = make("hope").hope_blocks()[0]
    assert hope.attn is None and hope.self_ref is not None  # no softmax attention in Hope
    assert make("hope_attention").hope_blocks()[0].memory is None


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("variant", list(CMS_VARIANTS))
@pytest.mark.parametrize("type_", TYPES)
def test_streaming_is_exact(type_: str, variant: str, train: bool) -> None:
    """One call == calls over chunks (cut inside and across segments) == one token per call."""
    model = make(type_, **CMS_VARIANTS[variant]).train(train)
    ids = ids_of(2, 13)
    full, state = model(ids)
    assert state.pos == 13
    torch.testing.assert_close(run_in_pieces(model, ids, [3, 4, 9]), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(run_in_pieces(model, ids, list(range(1, 13))), full,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("ablation", [
    {"static_projections": ["q", "k"]}, {"static_projections": ["q", "v"]},
    {"static_projections": []}, {"weight_decay": False}])
def test_self_ref_ablations_build_stream_and_learn(ablation: dict[str, object]) -> None:
    """The paper's ablation switches reach the Hope LM: exact streaming, gradients everywhere."""
    cfg = model_config("hope", chunk_sizes=[1, 4])
    cfg.self_ref = SelfRefConfig(memory_chunk_size=3, other_chunk_size=2, **ablation)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = build(cfg).double()
    ids = ids_of(2, 13)
    full, _ = model(ids)
    torch.testing.assert_close(run_in_pieces(model, ids, [3, 4, 9]), full, rtol=1e-10, atol=1e-10)
    next_token_loss(full, ids).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())


@pytest.mark.parametrize("variant", list(CMS_VARIANTS))
@pytest.mark.parametrize("type_", TYPES)
def test_causal_no_leakage(type_: str, variant: str) -> None:
    """Changing token 5 (the in-segment target of position 4) leaves logits 0..4 unchanged."""
    model = make(type_, **CMS_VARIANTS[variant]).eval()
    ids = ids_of(1, 12)
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % V
    with torch.no_grad():
        a, b = model(ids)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("variant", ["static", "nested"])
def test_state_is_not_modified(variant: str) -> None:
    """Two continuations of one prompt state equal the corresponding full runs."""
    model = make("hope_attn_titans", **CMS_VARIANTS[variant]).eval()
    prompt, a, b = ids_of(1, 5), ids_of(1, 6, seed=2), ids_of(1, 6, seed=3)
    _, state = model(prompt)
    out_a, _ = model(a, state)
    out_b, _ = model(b, state)
    torch.testing.assert_close(out_a, model(torch.cat((prompt, a), 1))[0][:, 5:])
    torch.testing.assert_close(out_b, model(torch.cat((prompt, b), 1))[0][:, 5:])


def test_state_must_match_the_model() -> None:
    static, learning = make(**CMS_VARIANTS["static"]), make(**CMS_VARIANTS["in_context"])
    _, state = static(ids_of(1, 4))
    with pytest.raises(ValueError, match="in_context"):
        learning(ids_of(1, 4), state)
    with pytest.raises(ValueError, match="batch"):
        static(ids_of(2, 4), state)


@pytest.mark.parametrize("variant", ["static", "in_context", "independent"])
@pytest.mark.parametrize("type_", TYPES)
def test_gradients_reach_every_parameter(type_: str, variant: str) -> None:
    model = make(type_, **CMS_VARIANTS[variant]).train()
    ids = ids_of(2, 10)
    logits, _ = model(ids)
    next_token_loss(logits, ids).backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing


def test_overfits_a_repeated_sequence() -> None:
    model = make(chunk_sizes=[1, 4]).float().train()
    ids = ids_of(1, 8).repeat(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(60):
        logits, _ = model(ids)
        loss = next_token_loss(logits, ids)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 < first


def test_flops_per_token() -> None:
    static = make(chunk_sizes=[1])
    transformer = build(ModelConfig(type="transformer", vocab_size=V, d_model=D, n_layers=L,
                                    n_heads=H, max_seq_len=16))
    assert static.flops_per_token(64) == transformer.flops_per_token(64)
    learning = make(chunk_sizes=[2], in_context=True)
    n = learning._matmul_params()
    assert learning.flops_per_token(64) == static.flops_per_token(64) + 12 * n
    titans = make("hope_attn_titans", chunk_sizes=[1])
    memory = sum(w.numel() for b in titans.hope_blocks() if b.memory is not None
                 for w in b.memory.memory_init)
    base = 6 * titans._matmul_params() + 12 * L * D * 64
    assert titans.flops_per_token(64) == base + 18 * memory
    hope = make("hope", chunk_sizes=[1])  # no softmax attention: no T-dependent term
    self_ref = sum(w.numel() for b in hope.hope_blocks() if b.self_ref is not None
                   for w in (*b.self_ref.other_init, *b.self_ref.memory_init))
    assert hope.flops_per_token(64) == hope.flops_per_token(1024) == 6 * hope._matmul_params() + 18 * self_ref


# ---- in-context CMS ---------------------------------------------------------------------


@pytest.mark.parametrize("type_", TYPES)
def test_zero_learning_rate_is_the_static_model(type_: str) -> None:
    static = make(type_, chunk_sizes=[2, 4])
    frozen = make(type_, chunk_sizes=[2, 4], in_context=True, lr=[0.0])
    ids = ids_of(2, 11)
    torch.testing.assert_close(frozen(ids)[0], static(ids)[0], rtol=1e-12, atol=1e-12)
    learning = make(type_, chunk_sizes=[2, 4], in_context=True, lr=[0.5])
    learned, _ = learning(ids)
    torch.testing.assert_close(learned[:, :2], static(ids)[0][:, :2], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(learned[:, 2:], static(ids)[0][:, 2:])  # changed from token 2 on


def test_no_grad_call_learns_in_context_and_returns_detached() -> None:
    model = make(**CMS_VARIANTS["in_context"]).eval()
    ids = ids_of(2, 9)
    with torch.no_grad():
        out, state = model(ids)
    assert not out.requires_grad
    torch.testing.assert_close(out, model(ids)[0].detach(), rtol=1e-12, atol=1e-12)
    assert state.cms is not None
    assert float(state.cms[0].levels[0].delta[0].abs().max()) > 0


@pytest.mark.parametrize("variant", ["in_context", "nested"])
def test_outer_gradient_flows_through_the_updates(variant: str) -> None:
    """In training, d loss / d θ_0 includes the path through the in-context updates: it matches
    a central finite difference of the loss along a random direction of all CMS weights."""
    model = make(**CMS_VARIANTS[variant]).train()
    ids = ids_of(2, 9)
    weights = [w for b in model.hope_blocks() for lv in b.cms.level_modules()
               for w in lv.initial_weights()]
    torch.manual_seed(5)
    direction = [torch.randn_like(w) for w in weights]

    def loss() -> torch.Tensor:
        return next_token_loss(model(ids)[0], ids)

    grads = torch.autograd.grad(loss(), weights)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True))
    eps = 1e-5
    values = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for w, d in zip(weights, direction, strict=True):
                w.add_(sign * eps * d)
            values.append(float(loss()))
            for w, d in zip(weights, direction, strict=True):
                w.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert numeric == pytest.approx(analytic, rel=1e-6)
    # The first-order (evaluation) inner loop gives θ_0 no gradient through the updates.
    model.eval()
    truncated = torch.autograd.grad(loss(), weights, allow_unused=True)
    assert all(g is None for g in truncated)


def test_in_context_learning_helps_on_a_repeated_sequence() -> None:
    """Meta-train a 1-layer model briefly with in-context CMS on "a random sequence, then the
    same again"; on new such sequences the second copy's loss is lower with the in-context
    updates than with the same weights and η = 0 (no updates), the first copy's about equal."""
    cms = {"chunk_sizes": [4, 8], "in_context": True}
    model = make(n_layers=1, lr=[1.0], **cms).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)

    def repeated(batch: int) -> torch.Tensor:
        seq = torch.randint(0, V, (batch, 12), generator=gen)
        return torch.cat((seq, seq), dim=1)

    for _ in range(30):
        ids = repeated(8)
        logits, _ = model(ids)
        optimizer.zero_grad()
        next_token_loss(logits, ids).backward()
        optimizer.step()
    frozen = make(n_layers=1, lr=[0.0], **cms).float()
    frozen.load_state_dict(model.state_dict())
    ids = repeated(32)
    losses = {}
    for name, m in (("on", model.eval()), ("off", frozen.eval())):
        with torch.no_grad():
            logits, _ = m(ids)
        losses[name] = (next_token_loss(logits[:, :12], ids[:, :12]).item(),
                        next_token_loss(logits[:, 12:], ids[:, 12:]).item())
    assert losses["on"][1] < losses["off"][1] - 0.1
    assert losses["on"][0] == pytest.approx(losses["off"][0], abs=0.1)


def test_pilot_budget_and_micro_batch_fit_a_24_gb_machine() -> None:
    """`hope/pilot` compiles its chunks with a 50% activation budget and trains the Transformer
    pilot's tokens per step in 4 x 1024 micro-batches (~185 KB per token and self-referential
    layer: ~6 GB for them); the budget reaches the layers and is validated."""
    cfg = load_config("hope/pilot", [])
    base = load_config("transformer/pilot", [])
    assert self_ref_config(cfg.model).compile
    assert self_ref_config(cfg.model).activation_budget == 0.5
    assert cfg.train.batch_size * cfg.train.grad_accum == base.train.batch_size * base.train.grad_accum
    assert cfg.train.batch_size * cfg.train.seq_len <= 4096
    with pytest.raises(ConfigError, match=r"model\.self_ref\.activation_budget"):
        load_config("hope/pilot", ["model.self_ref.activation_budget=0"])


def test_compiled_titans_memory_works_under_in_context_cms() -> None:
    """`model.titans.memory_compile` keeps double backward (its `create_graph` backwards run
    eagerly), so unlike `model.self_ref.compile` it is allowed with in-context CMS, whose inner
    gradients differentiate the block twice (through the memory too: its backward runs under
    `create_graph` there): `hope_attn_titans` gives the eager logits and outer gradients with it
    on. In-context CMS feeds the blocks 2 tokens at a time, so memory chunks of 2 are complete
    in each call and compiled."""
    results = []
    chunked._compiled_steps.cache_clear()
    for compiled in (False, True):
        cfg = model_config("hope_attn_titans", **CMS_VARIANTS["in_context"])
        cfg.titans.memory_compile = compiled
        cfg.titans.memory_chunk_size = 2
        torch.manual_seed(0)
        model = build(cfg).double()
        logits, _ = model(ids_of(2, 12))
        params = list(model.parameters())
        grads = torch.autograd.grad(logits.square().mean(), params, allow_unused=True)
        results.append((logits, grads))
    assert chunked._compiled_steps.cache_info().currsize == 1  # the compiled chunks did run
    (logits, grads), (logits_c, grads_c) = results
    torch.testing.assert_close(logits_c, logits, rtol=1e-9, atol=1e-10)
    assert sum(g is not None for g in grads) > 10
    for g, g_c in zip(grads, grads_c, strict=True):
        assert (g is None) == (g_c is None)
        if g is not None and g_c is not None:
            torch.testing.assert_close(g_c, g, rtol=1e-9, atol=1e-10)

