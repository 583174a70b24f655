"""nestlearn's C++ CPU kernel for the DGD systems (``memory.cpu_kernels``) against
``torch.linalg.solve_triangular`` (inside the self-referential layer: ``test_self_ref``)."""

from __future__ import annotations

import subprocess

import pytest
import torch
from torch.utils import cpp_extension

from nestlearn.memory import cpu_kernels

OPTION = "model.self_ref.compile"
SHAPES = [  # (system, right-hand sides): shared over the stacked memories, full, broadcast, one system
    ((2, 3, 1, 6, 6), (2, 3, 5, 6, 64)),
    ((2, 3, 6, 6), (2, 3, 6, 5)),
    ((1, 3, 6, 6), (2, 3, 6, 32)),
    ((6, 6), (2, 3, 6, 7)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize(("system_shape", "rhs_shape"), SHAPES)
def test_solve_matches_torch(system_shape: tuple[int, ...], rhs_shape: tuple[int, ...], transpose: bool,
                             dtype: torch.dtype) -> None:
    """Only the strict lower triangle is read (unit diagonal), as with ``unitriangular=True``;
    widths with a register-blocked loop (32, 64) and without (5, 7)."""
    gen = torch.Generator().manual_seed(0)
    system = 0.3 * torch.randn(system_shape, generator=gen, dtype=dtype)
    rhs = torch.randn(rhs_shape, generator=gen, dtype=dtype)
    want = (torch.linalg.solve_triangular(system.transpose(-1, -2), rhs, upper=True, unitriangular=True)
            if transpose else torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True))
    got = cpu_kernels.unit_triangular_solve(system, rhs, transpose, OPTION)
    assert got.shape == want.shape
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)


def test_a_failed_build_is_one_line_naming_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise subprocess.CalledProcessError(1, ["c++", "unit_triangular.cpp"])

    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.raises(RuntimeError, match=r"^model\.self_ref\.compile=true: building nestlearn's C\+\+ CPU "
                                           r"kernel failed \(CalledProcessError: .*\); set "
                                           r"model\.self_ref\.compile=false") as err:
        cpu_kernels.build(OPTION)
    assert "\n" not in str(err.value)


def test_the_source_ships_with_the_package() -> None:
    assert cpu_kernels.SOURCE.is_file()
