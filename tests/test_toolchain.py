"""Without a C++ compiler (or triton), a layer whose compile switch is on runs torch's own ops,
the same outputs, after one warning line that names the switch."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from nestlearn.memory import cpu_kernels, toolchain
from nestlearn.memory.neural_memory import NeuralMemory, NeuralMemoryConfig
from nestlearn.memory.self_ref import SelfRefTitans, SelfRefTitansConfig


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def fail(option: str) -> None:
        raise RuntimeError(f"{option}=true: building failed") from FileNotFoundError("c++: not found")

    monkeypatch.setattr(cpu_kernels, "build", fail)
    monkeypatch.setattr(toolchain, "_warned", set())
    toolchain.missing.cache_clear()
    yield
    toolchain.missing.cache_clear()


@pytest.mark.parametrize("layer", ["self_ref", "titans"])
def test_compile_falls_back_to_torch_ops_with_one_warning(layer: str, no_compiler: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    def make(compile_: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        if layer == "self_ref":
            return SelfRefTitans(SelfRefTitansConfig(d_model=16, heads=2, head_dim=8, memory_chunk_size=4,
                                                     other_chunk_size=4, compile=compile_))
        return NeuralMemory(NeuralMemoryConfig(d_model=16, heads=2, head_dim=8, chunk_size=4,
                                               compile=compile_))

    x = torch.randn(2, 10, 16)
    eager, fallback = make(False), make(True)
    expected = eager(x)[0]
    for _ in range(2):
        torch.testing.assert_close(fallback(x)[0], expected, rtol=0, atol=0)
    err = capsys.readouterr().err.strip().splitlines()
    option = "model.self_ref.compile" if layer == "self_ref" else "model.titans.memory_compile"
    assert len(err) == 1 and err[0].startswith(f"nestlearn: warning: {option}=true"), err
    assert "C++ compiler" in err[0] and "c++: not found" in err[0] and "slower" in err[0]
