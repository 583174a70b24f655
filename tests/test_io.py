"""Atomic writes leave files and directories with the modes a plain write would (the umask's),
not the private ones of temporary files."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from nestlearn.utils.io import atomic_directory, atomic_write_json


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_respect_the_umask(tmp_path: Path, umask_022: None) -> None:
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "f.txt").write_text("hi")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert (tmp_path / "d" / "f.txt").read_text() == "hi"
