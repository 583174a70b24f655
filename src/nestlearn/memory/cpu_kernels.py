"""nestlearn's C++ CPU kernels (``csrc/``), built with the system's C++ compiler on first use.

* ``unit_triangular_solve``: the DGD chunk update of ``self_ref`` solves many small
  unit-triangular systems (C × C, with head-width right-hand sides).
  ``torch.linalg.solve_triangular`` expands a broadcast system, copies both operands to
  column-major and makes one LAPACK call per matrix: at these sizes ~3× slower on CPU than the
  register-blocked loops of ``csrc/unit_triangular.cpp``. It has no autograd: callers use it
  where no graph is recorded and keep torch's solve elsewhere.
* ``matmul``: the memories' many small products (64 × 64 blocks batched over batch × heads ×
  memories) through oneDNN's small-GEMM micro-kernel, one matrix at a time
  (``csrc/batched_matmul.cpp``), instead of MKL's batched GEMM, which packs every operand; with
  operands that no longer sit in cache, as in the chunk step, ~1.25× faster on a Zen 4 CPU. It
  has autograd (its backward is two more of its products), so traced code uses it throughout.

The compiled path (``model.self_ref.compile``), which already needs a C++ compiler, uses both;
they are built once per machine and source (``torch.utils.cpp_extension`` caches the build; 10-40 s
the first time).
"""

from __future__ import annotations

import functools
import hashlib
import math
import subprocess
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from nestlearn.utils.compiling import first_line

SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in ("unit_triangular.cpp", "batched_matmul.cpp"))
FLAGS = ["-O3", "-march=native", "-fopenmp"]


def _machine_tag() -> str:
    """A short hash of the CPU's instruction-set flags: the build uses ``-march=native``, so a
    cache shared between machines (a home directory on a cluster) keeps one build per CPU kind."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


@functools.cache
def load(option: str) -> None:
    """Build (or take from the cache) and load the kernels, once per process; ``option`` is the
    config switch that a build failure names (like ``utils.compiling.call_compiled``)."""
    build(option)
    torch.library.register_fake("nestlearn::unit_triangular_solve")(_solve_shape)
    torch.library.register_fake("nestlearn::batched_matmul")(_product_shape)
    torch.library.register_autograd("nestlearn::batched_matmul", _product_backward,
                                    setup_context=_product_setup)
    # Its FLOPs, for FlopCounterMode and for AOTAutograd's partitioner, which weighs what to
    # recompute under an activation budget by FLOPs: without them the products look free.
    register_flop_formula(torch.ops.nestlearn.batched_matmul)(_product_flops)


def build(option: str) -> None:
    """Compile (or find in ``torch.utils.cpp_extension``'s cache) and load the library; a failure
    is one line naming ``option``."""
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(f"nestlearn_cpu_kernels_{_machine_tag()}", [str(p) for p in SOURCES], extra_cflags=FLAGS,
                           extra_ldflags=["-fopenmp"], is_python_module=False)
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"{option}=true: building nestlearn's C++ CPU kernel failed ({first_line(exc)}); "
                           f"set {option}=false, or install a C++ compiler with OpenMP") from exc


def _solve_shape(system: Tensor, rhs: Tensor, transpose: bool) -> Tensor:
    """The op's output for tracing (``torch.compile``): contiguous, like the kernel's."""
    return rhs.new_empty(rhs.shape)


def unit_triangular_solve(system: Tensor, rhs: Tensor, transpose: bool, option: str) -> Tensor:
    """X with (I + strict_lower(system)) X = rhs, or with that matrix transposed (``transpose``):
    ``torch.linalg.solve_triangular(..., unitriangular=True)`` without autograd, CPU only.
    ``system`` ``(..., n, n)`` broadcasts against ``rhs`` ``(..., n, d)``; a system shared over
    trailing batch dims (the stacked memories' first layer) is solved without being expanded.
    Traced code (``torch.compile``) expects the kernel loaded already: loading is not traceable."""
    if not torch.compiler.is_compiling():
        load(option)
    n, d = rhs.shape[-2:]
    batch = torch.broadcast_shapes(system.shape[:-2], rhs.shape[:-2])  # type: ignore[no-untyped-call]
    own = (1,) * (len(batch) - (system.dim() - 2)) + tuple(system.shape[:-2])
    split = len(batch)
    while split > 0 and own[split - 1] == 1:
        split -= 1
    if own[:split] != batch[:split]:  # broadcast in a leading dim: expand (copies)
        system, split = system.expand(*batch, n, n), len(batch)
    systems = system.reshape(math.prod(batch[:split]), n, n)
    out: Tensor = torch.ops.nestlearn.unit_triangular_solve(systems, rhs.expand(*batch, n, d).reshape(-1, n, d),
                                                             transpose)
    return out.view(*batch, n, d)


def _product_shape(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty(*a.shape[:-1], b.shape[-1])


def _product_flops(a: torch.Size, b: torch.Size, *args: object, **kwargs: object) -> int:
    return 2 * math.prod(a) * b[-1]


def _product_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _product_backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor]:
    """d(a b): grad bᵀ and aᵀ grad, with the op itself (so it can be differentiated again)."""
    a, b = ctx.saved_tensors  # type: ignore[attr-defined]
    op = torch.ops.nestlearn.batched_matmul
    return op(grad, b.transpose(-1, -2)), op(a.transpose(-1, -2), grad)


def matmul(a: Tensor, b: Tensor, option: str | None) -> Tensor:
    """``a @ b`` for ``(..., M, K)`` and ``(..., K, N)`` operands with broadcast batch dims; with
    an ``option`` (the config switch a build failure names), CPU float32/float64 operands of at
    least 3 dims outside autocast go through ``batched_matmul`` (module docstring), anything else
    through torch. Broadcast batch dims are passed as stride-0 views, not copied."""
    if (option is None or a.device.type != "cpu" or a.dtype != b.dtype
            or a.dtype not in (torch.float32, torch.float64) or min(a.dim(), b.dim()) < 2
            or max(a.dim(), b.dim()) < 3 or torch.is_autocast_enabled(a.device.type)):
        return a @ b
    if not torch.compiler.is_compiling():
        load(option)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])  # type: ignore[no-untyped-call]
    out: Tensor = torch.ops.nestlearn.batched_matmul(a.expand(*batch, *a.shape[-2:]), b.expand(*batch, *b.shape[-2:]))
    return out
