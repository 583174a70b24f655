"""Print ``pinned.txt`` as the pip constraints for this environment: a torch that is already
installed (a CUDA build the user chose, say) is kept, not replaced by the pinned CPU one;
everything else stays pinned. Used by the Makefile: ``python requirements/constraints.py
requirements/pinned.txt > .venv/constraints.txt``."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

KEPT_IF_INSTALLED = ("torch",)


def constraints(pinned: str, installed: dict[str, str | None]) -> str:
    """``pinned`` without the pins of packages in ``KEPT_IF_INSTALLED`` that ``installed``
    (name -> version, None if absent) has."""
    def kept(line: str) -> bool:
        name = line.split("==", 1)[0].strip().lower()
        return not (name in KEPT_IF_INSTALLED and installed.get(name) is not None)

    return "".join(f"{line}\n" for line in pinned.splitlines() if kept(line))


def installed_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in KEPT_IF_INSTALLED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


if __name__ == "__main__":
    sys.stdout.write(constraints(Path(sys.argv[1]).read_text(), installed_versions()))
