"""nestlearn's C++ CPU kernels (``csrc/``), built with the system's C++ compiler on first use.

The DGD chunk update of ``self_ref`` solves many small unit-triangular systems (C × C, with
head-width right-hand sides). ``torch.linalg.solve_triangular`` expands a broadcast system,
copies both operands to column-major and makes one LAPACK call per matrix: at these sizes ~3×
slower on CPU than the register-blocked loops of ``csrc/unit_triangular.cpp``. The compiled path
(``model.self_ref.compile``), which already needs a C++ compiler, uses the kernel; it is built
once per machine and source (``torch.utils.cpp_extension`` caches it; ~30 s the first time) and
has no autograd: callers use it where no graph is recorded and keep torch's solve elsewhere.
"""

from __future__ import annotations

import functools
import hashlib
import math
import subprocess
from pathlib import Path

import torch
from torch import Tensor

from nestlearn.utils.compiling import first_line

SOURCE = Path(__file__).parent / "csrc" / "unit_triangular.cpp"
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


def build(option: str) -> None:
    """Compile (or find in ``torch.utils.cpp_extension``'s cache) and load the library; a failure
    is one line naming ``option``."""
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(f"nestlearn_cpu_kernels_{_machine_tag()}", [str(SOURCE)], extra_cflags=FLAGS,
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
