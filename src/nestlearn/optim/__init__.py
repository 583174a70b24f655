"""Optimizers as associative memories, the DeepNestedOptimizer family, level clocks, surprise.

Everything here depends only on torch: plug any of it into your own training loop, or pick
it with `optimizer.type` in a run config.
"""

from nestlearn.optim.chunked import ChunkedAdamW, chunked_groups
from nestlearn.optim.controller import NestedController
from nestlearn.optim.deep_nested import (
    ContinuumMemoryState,
    DeepNestedOptimizer,
    L2RegressionMomentum,
)
from nestlearn.optim.dgd import DeltaGradientDescent, dgd_proximal_update, dgd_update
from nestlearn.optim.dmgd import DeepMomentumGD
from nestlearn.optim.factory import (
    build_optimizer,
    build_scheduler,
    lr_factor,
    owns_learning_rate,
    param_groups,
)
from nestlearn.optim.level_clock import ChunkedUpdateScheduler, setup_optimizers
from nestlearn.optim.lr_controller import NestedDQNOptimizer, NestedLRController
from nestlearn.optim.m3 import M3
from nestlearn.optim.meta_step import MetaOptimizer, nested_training_step
from nestlearn.optim.meta_trainer import (
    SimplifiedMetaTrainer,
    UnrolledMetaTrainer,
    create_meta_trainer,
)
from nestlearn.optim.momentum import DeltaMomentum, PreconditionedMomentum
from nestlearn.optim.newton_schulz import newton_schulz
from nestlearn.optim.param_groups import group_titans_params, infer_param_depth
from nestlearn.optim.surprise import SurpriseLossComputer

__all__ = [
    "M3",
    "ChunkedAdamW",
    "ChunkedUpdateScheduler",
    "ContinuumMemoryState",
    "DeepMomentumGD",
    "DeepNestedOptimizer",
    "DeltaGradientDescent",
    "DeltaMomentum",
    "L2RegressionMomentum",
    "MetaOptimizer",
    "NestedController",
    "NestedDQNOptimizer",
    "NestedLRController",
    "PreconditionedMomentum",
    "SimplifiedMetaTrainer",
    "SurpriseLossComputer",
    "UnrolledMetaTrainer",
    "build_optimizer",
    "build_scheduler",
    "chunked_groups",
    "create_meta_trainer",
    "dgd_proximal_update",
    "dgd_update",
    "group_titans_params",
    "infer_param_depth",
    "lr_factor",
    "nested_training_step",
    "newton_schulz",
    "owns_learning_rate",
    "param_groups",
    "setup_optimizers",
]
