"""Build the outer-loop optimizer and its learning-rate schedule from a config.

Parameters are split so that matrices decay and norms/biases/gains do not; the
orthogonalising optimizers (dmgd, m3) take only the hidden matrices and hand embeddings and
vectors to their AdamW fallback, as Muon-style optimizers do.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nestlearn.config.schema import OptimizerConfig
from nestlearn.optim.chunked import ChunkedAdamW, chunked_groups
from nestlearn.optim.deep_nested import DeepNestedOptimizer
from nestlearn.optim.dmgd import DeepMomentumGD
from nestlearn.optim.m3 import M3
from nestlearn.optim.momentum import DeltaMomentum

Group = dict[str, object]


def _unique_trainable(model: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    params = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def param_groups(model: nn.Module, weight_decay: float) -> list[Group]:
    """Weight decay on matrices (dim >= 2) only: decaying gains and biases hurts and is unusual."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in _unique_trainable(model):
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def orthogonal_groups(model: nn.Module, cfg: OptimizerConfig, fallback_key: str,
                      fallback_value: bool) -> list[Group]:
    """Hidden matrices at `matrix_lr`; embeddings (decayed) and vectors via the AdamW fallback."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden, embeddings, vectors = [], [], []
    for p in _unique_trainable(model):
        if id(p) in embedding_ids:
            embeddings.append(p)
        elif p.dim() >= 2:
            hidden.append(p)
        else:
            vectors.append(p)
    fallback = {fallback_key: fallback_value, "lr": cfg.lr}
    groups: list[Group] = [
        {"params": hidden, "lr": cfg.matrix_lr or cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": embeddings, "weight_decay": cfg.weight_decay, **fallback},
        {"params": vectors, "weight_decay": 0.0, **fallback},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.type`, over `model`'s trainable parameters."""
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.type == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas,
                                 eps=cfg.eps)
    if cfg.type == "delta_momentum":
        return DeltaMomentum(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             momentum=cfg.momentum)
    if cfg.type == "dmgd":
        return DeepMomentumGD(orthogonal_groups(model, cfg, "adamw_fallback", True), lr=cfg.lr,
                              momentum=cfg.momentum, adam_betas=betas, adam_eps=cfg.eps)
    if cfg.type == "m3":
        return M3(orthogonal_groups(model, cfg, "orthogonalize", False), lr=cfg.lr,
                  alpha=cfg.m3_alpha, frequency=cfg.m3_frequency, adam_betas=betas,
                  adam_eps=cfg.eps)
    if cfg.type == "nested":
        n = cfg.nested_optimizer
        return DeepNestedOptimizer(
            model, base_lr=cfg.lr, meta_lr=n.meta_lr, k_unroll=n.k_unroll,
            cms_frequencies=list(n.cms_frequencies), momentum_hidden_dim=n.momentum_hidden_dim,
            controller_hidden_dim=n.controller_hidden_dim,
            use_gradient_checkpointing=n.use_gradient_checkpointing, mode=n.mode,
            meta_update_freq=n.meta_update_freq, weight_decay=n.weight_decay)
    if cfg.type == "chunked":
        sizes = getattr(model, "level_chunk_sizes", None)
        if sizes is None:
            raise ValueError(f"optimizer.type=chunked needs a model that declares CMS levels "
                             f"(level_chunk_sizes()); {type(model).__name__} declares none: use "
                             f"a CMS model such as hope_attention")
        return ChunkedAdamW(chunked_groups(model, sizes(), cfg.lr, cfg.weight_decay, cfg.level_lr),
                            betas=betas, eps=cfg.eps)
    raise ValueError(f"optimizer.type={cfg.type!r} is not known; expected one of adamw, nested, "
                     "dmgd, delta_momentum, m3, chunked")


def owns_learning_rate(optimizer: torch.optim.Optimizer) -> bool:
    """True when a learned controller sets the learning rate, so no schedule should run."""
    return isinstance(optimizer, DeepNestedOptimizer)


def lr_factor(step: int, total_steps: int, cfg: OptimizerConfig) -> float:
    """Linear warmup to 1, then cosine (or constant) decay to `min_lr_ratio` at `total_steps`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(cfg: OptimizerConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR | None:
    """Warmup + cosine; None when the optimizer's controller owns the learning rate."""
    if owns_learning_rate(optimizer):
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg)
    )
