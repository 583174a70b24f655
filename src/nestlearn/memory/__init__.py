"""In-context associative memories: the Titans neural long-term memory (Behrouz et al. 2025)
and the self-referential Titans of Nested Learning (memories that generate their own values).

Functional core (``mlp``, ``chunked``, ``reference``, ``state``), the ``NeuralMemory`` layer and
the ``SelfRefTitans`` layer.
"""

from nestlearn.memory.chunked import (
    ChunkCoefficients,
    ScanResult,
    chunked_memory_scan,
    current_memory,
    memory_chunk,
    segment_sums,
)
from nestlearn.memory.mlp import MemoryMLPSpec, RankOneGrads, l2_loss_grads, mlp_forward
from nestlearn.memory.neural_memory import NeuralMemory, NeuralMemoryConfig
from nestlearn.memory.reference import autograd_loss_grad, reference_memory_scan
from nestlearn.memory.self_ref import SelfRefState, SelfRefTitans, SelfRefTitansConfig
from nestlearn.memory.state import MemoryState, MemoryStats, MemoryWeights, Writes

__all__ = [
    "ChunkCoefficients",
    "MemoryMLPSpec",
    "MemoryState",
    "MemoryStats",
    "MemoryWeights",
    "NeuralMemory",
    "NeuralMemoryConfig",
    "RankOneGrads",
    "ScanResult",
    "SelfRefState",
    "SelfRefTitans",
    "SelfRefTitansConfig",
    "Writes",
    "autograd_loss_grad",
    "chunked_memory_scan",
    "current_memory",
    "l2_loss_grads",
    "memory_chunk",
    "mlp_forward",
    "reference_memory_scan",
    "segment_sums",
]
