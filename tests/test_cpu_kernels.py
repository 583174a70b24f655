"""nestlearn's C++ CPU kernels (``memory.cpu_kernels``): the DGD systems against
``torch.linalg.solve_triangular`` and the batched products against ``torch.matmul``, outputs and
gradients (inside the self-referential layer: ``test_self_ref``)."""

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


def test_the_sources_ship_with_the_package() -> None:
    assert all(source.is_file() for source in cpu_kernels.SOURCES)


PRODUCTS = [  # (a, b): the chunk step's 64 x 64 blocks (16 x 16 register-tile transposes), a
    # broadcast first-layer input, odd sizes (plain copies), one batch dim, a row vector
    ((2, 3, 5, 64, 64), (2, 3, 5, 64, 64)),
    ((2, 3, 1, 64, 32), (2, 3, 5, 32, 48)),
    ((2, 7, 5), (1, 5, 65)),
    ((4, 1, 6), (4, 6, 3)),
]


def _layout(x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """x itself, or the same values held column-major (a transposed view)."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2) if transposed else x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layouts", ["NN", "TN", "NT", "TT"])
@pytest.mark.parametrize(("a_shape", "b_shape"), PRODUCTS)
def test_matmul_matches_torch(a_shape: tuple[int, ...], b_shape: tuple[int, ...], layouts: str,
                              dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    a = _layout(torch.randn(a_shape, generator=gen, dtype=dtype), layouts[0] == "T")
    b = _layout(torch.randn(b_shape, generator=gen, dtype=dtype), layouts[1] == "T")
    got = cpu_kernels.matmul(a, b, OPTION)
    want = a @ b
    assert got.shape == want.shape
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)


def test_matmul_gradients_first_and_second() -> None:
    """Its autograd (its backward is made of itself) through a broadcast batch dim and a
    transposed operand, against finite differences."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 3, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)

    def product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.matmul(x, y.transpose(-1, -2), OPTION)

    assert torch.autograd.gradcheck(product, (a, b))
    assert torch.autograd.gradgradcheck(product, (a, b))


def test_matmul_without_an_option_or_off_cpu_float_is_torch() -> None:
    """No option, integer operands or plain matrices: torch's product, no kernel call."""
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    ints = torch.arange(24).view(2, 3, 4), torch.arange(40).view(2, 4, 5)
    with torch.profiler.profile() as prof:
        torch.testing.assert_close(cpu_kernels.matmul(a, b, None), a @ b)
        assert torch.equal(cpu_kernels.matmul(*ints, OPTION), ints[0] @ ints[1])
        torch.testing.assert_close(cpu_kernels.matmul(a[0], b[0], OPTION), a[0] @ b[0])
    assert not any("nestlearn" in e.key for e in prof.key_averages())


def test_matmul_counts_its_flops() -> None:
    cpu_kernels.load(OPTION)
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5, 6)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        cpu_kernels.matmul(a, b, OPTION)
    assert counter.get_total_flops() == 2 * 2 * 3 * 4 * 5 * 6
