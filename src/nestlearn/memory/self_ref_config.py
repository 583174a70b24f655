"""The options of self-referential Titans (``SelfRefTitansConfig``) and the names of its
memories: one module that the layer, its chunk step and its DGD update all read."""

from __future__ import annotations

from dataclasses import dataclass

from nestlearn.memory.mlp import Activation, MemoryMLPSpec

GENERATORS = ("k", "v", "q", "eta", "alpha")
"""The memories the "other" group can hold, in the order they are stacked (dim -3 of their
weights); ``SelfRefTitansConfig.generated`` says which a layer has."""
PROJECTIONS = ("k", "v", "q")
"""The inputs that may instead be static projections x_t W (``static_projections``)."""

COMPILE_OPTION = "model.self_ref.compile"
"""The config switch that ``call_compiled`` names when a compiled step fails to build."""


@dataclass(frozen=True)
class SelfRefTitansConfig:
    """Options of ``SelfRefTitans``; each switches one term of the equations (module docstring).

    ``d_model`` must equal ``heads * head_dim`` (each head reads its slice of x_t).
    ``depth``/``expansion``/``activation``: every memory M_□ (residual, Eq. 91).
    ``memory_chunk_size`` / ``other_chunk_size``: C of M_memory / of M_k, M_v, M_η, M_α.
    ``momentum``: learned-β momentum inside every memory; ``dgd``: the (α I - η z zᵀ) decay
    (``False``: plain retention α W). ``qk_norm``: L2-normalise q and k. ``v_norm``: L2-normalise
    v too: not in the paper, but ``hope`` sets it (``model.self_ref.v_norm``), since without it the
    self-generated targets v̂ = M(v) feed back and, on unit-scale inputs at this initialisation,
    the memories overflow in context (white noise at the pilot's width: outputs ~1e18 after 256
    tokens, NaN by 1024); leave it off only with inputs and steps that keep v small. ``conv_kernel``:
    causal depthwise convolution of the inputs, 0 disables. ``eta_max``: bound of η_t.
    ``init_scale``: initial memory weights are N(0, init_scale² / fan_in). ``step_bound``: scale
    a chunk's steps so that their sum along the keys they share stays stable
    (``dgd_chunk.chunk_step_scale``; the per-token recurrence is never changed); off, the chunk
    form of Eq. 90 diverged in context where the per-token one did not. ``curvature_step``:
    each layer's step η_t / max(1, g ||z||²) counts the curvature the layers above it add (g,
    ``dgd_chunk.curvature_gains``); off, g = 1 (the input energy alone), with which a trained
    HOPE's M_memory diverged past its training length, in the per-token recurrence too.
    ``in_chunk_reads``:
    o_t = M_memory,t-1(q_t) reads the memory with the writes of the earlier tokens of its own
    chunk applied, as the per-token recurrence does (``dgd_chunk.read_chunk``); off,
    o_t = M_memory,t'(q_t) reads the chunk-start memory (Eq. 90's read), so that inside a chunk
    a token sees its neighbours only through the convolution. ``mix_input``: a learned d × d
    projection of x_t (after the convolution, initialised to the identity) before the head
    split, so that each head's memories read the whole token, as the paper's M_□: R^d -> R^d
    do; off (the default: it trained worse at smoke scale, docs/results.md), each head's
    memories read only its d/H slice of x_t and see the other heads' features only through
    ``to_out`` and the next layer (the static q is projected from the whole token either way).

    Ablations of the paper's table: ``static_projections`` lists which of k, v, q are static
    projections x_t W (moved to the lowest-frequency level: learned by the outer loop only)
    instead of the output of an in-context memory M_k, M_v, M_q; Hope's own is ``("q",)``
    (Eq. 84), ``()`` generates q by a memory M_q too. ``weight_decay=False`` fixes α_t ≡ 1 (no
    M_α): the DGD decay becomes (I - η_t k_t k_tᵀ), the plain step W + S.

    ``compile``: run each full chunk of the aligned path (equal chunk sizes, static q: Hope's
    own setting) through ``torch.compile``, which fuses the many elementwise passes over the
    ``(B, H, 5, C, C)`` and ``(B, H, 5, d, d)`` tensors of forward and backward (1.7× at 2
    threads, 2× at 1 on a 2-core CPU). Layers of one config share one compiled step; the first
    call compiles it (seconds to a minute, cached on disk by inductor). On CPU it also solves
    the DGD systems, in every path, with nestlearn's C++ kernel (``cpu_kernels``: built on
    first use, 10-40 s, cached; 1.13× on the pilot's layer), and makes the memories' small
    products (the compiled chunk's and the DGD update's) with its batched matmul (1.11-1.12× on
    the pilot's layer at budgets 0.5-1.0 on a Zen 4 CPU, none at 0.2). Its backward cannot
    itself be differentiated (``create_graph``): leave it off for meta-objectives through the
    model. ``activation_budget`` (with ``compile``): the fraction of the compiled chunk's
    activations kept for backward (``torch._functorch.config.activation_memory_budget``);
    below 1 the partitioner recomputes the cheapest of the rest in backward. The saved
    activations are what limit sequence length: at the pilot's width (8 heads of 64), per token
    and layer, 322 KB with 1.0, 185 KB with 0.5 and 63 KB with 0.2 (the layer ~1.04× and ~1.18×
    slower than at 1.0 with the C++ products on a Zen 4 CPU).
    """

    d_model: int
    heads: int = 4
    head_dim: int = 64
    depth: int = 2
    expansion: float = 1.0
    activation: Activation = "silu"
    memory_chunk_size: int = 64
    other_chunk_size: int = 64
    momentum: bool = True
    dgd: bool = True
    qk_norm: bool = True
    v_norm: bool = False
    conv_kernel: int = 4
    eta_max: float = 0.5
    init_scale: float = 1.0
    static_projections: tuple[str, ...] = ("q",)
    weight_decay: bool = True
    in_chunk_reads: bool = True
    mix_input: bool = False
    step_bound: bool = True
    curvature_step: bool = True
    compile: bool = False
    activation_budget: float = 1.0

    def __post_init__(self) -> None:
        for name in ("d_model", "heads", "head_dim", "memory_chunk_size", "other_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.heads * self.head_dim != self.d_model:
            raise ValueError(f"d_model ({self.d_model}) must equal heads * head_dim "
                             f"({self.heads} * {self.head_dim})")
        if self.conv_kernel < 0:
            raise ValueError(f"conv_kernel must be >= 0, got {self.conv_kernel}")
        if self.eta_max <= 0:
            raise ValueError(f"eta_max must be > 0, got {self.eta_max}")
        if self.init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale}")
        if not 0 < self.activation_budget <= 1:
            raise ValueError(f"activation_budget must be in (0, 1], got {self.activation_budget}")
        static = self.static_projections
        if len(set(static)) != len(static) or not set(static) <= set(PROJECTIONS):
            raise ValueError(f"static_projections must be distinct names among {PROJECTIONS}, "
                             f"got {static!r}")
        self.spec()  # validates depth, expansion, activation

    def spec(self) -> MemoryMLPSpec:
        return MemoryMLPSpec(self.head_dim, self.depth, self.expansion, self.activation, residual=True)

    @property
    def generated(self) -> tuple[str, ...]:
        """The in-context memories of the "other" group, in stacking order."""
        return tuple(n for n in GENERATORS if n not in self.static_projections
                     and (n != "alpha" or self.weight_decay))

