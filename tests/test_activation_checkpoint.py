"""Activation checkpointing: the same loss and gradients as the plain model for every model
family, parameter names unchanged; refused where it cannot apply."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestlearn.config import ModelConfig
from nestlearn.config.schema import CMSConfig, SelfRefConfig, TitansConfig
from nestlearn.models import build
from nestlearn.train.activation_checkpoint import apply_activation_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")

V = 29


def tiny(type_: str, **cms: object) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(type=type_, vocab_size=V, d_model=16, n_layers=2, n_heads=2, max_seq_len=32,
                      titans=TitansConfig(memory_heads=2, memory_head_dim=8, memory_chunk_size=3),
                      self_ref=SelfRefConfig(memory_chunk_size=4, other_chunk_size=4),
                      cms=CMSConfig(**cms))  # type: ignore[arg-type]
    return build(cfg).double()


def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits, _ = model(ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("type_", "cms"), [
    ("transformer", {}),
    ("titans_mac", {}),
    ("hope", {"chunk_sizes": [1, 4]}),
    ("hope_attention", {"chunk_sizes": [1, 4]}),
])
def test_checkpointed_model_has_the_same_loss_and_gradients(type_: str, cms: dict[str, object]) -> None:
    plain = tiny(type_, **cms)
    wrapped = copy.deepcopy(plain)
    assert apply_activation_checkpointing(wrapped) == 2
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))
    loss, grads = loss_and_grads(plain, ids)
    loss_ck, grads_ck = loss_and_grads(wrapped, ids)
    torch.testing.assert_close(loss_ck, loss, rtol=0, atol=1e-12)
    assert grads_ck.keys() == grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(grads_ck[name], g, rtol=1e-9, atol=1e-12, msg=name)


def test_a_model_without_blocks_or_with_in_context_cms_is_refused() -> None:
    with pytest.raises(ValueError, match="blocks"):
        apply_activation_checkpointing(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="in_context"):
        apply_activation_checkpointing(tiny("hope_attention", chunk_sizes=[2, 4], in_context=True))
