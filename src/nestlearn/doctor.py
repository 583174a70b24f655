"""`nestlearn doctor`: what this installation has and can do, in one screen (versions, device,
threads, the C++ kernels, the default corpus), for bug reports and for a first check on a new
machine."""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version

import torch

from nestlearn import __version__
from nestlearn.config.loader import PACKAGE_CONFIGS, available_configs
from nestlearn.data.corpus import stdlib_root
from nestlearn.memory import toolchain

# optional extras: (extra, the package that stands for it)
EXTRAS = (("report", "matplotlib"), ("parquet", "pyarrow"), ("hf", "transformers"), ("hf", "datasets"),
          ("eval", "lm_eval"), ("tensorboard", "tensorboard"), ("wandb", "wandb"))


def _version(package: str) -> str:
    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return "not installed"


def checks() -> list[tuple[str, str, bool]]:
    """(what, finding, ok) rows; ok False marks what keeps a default `nestlearn run` from working
    as it should."""
    rows = [("nestlearn", __version__, True), ("python", f"{platform.python_version()} ({sys.executable})", True),
            ("torch", torch.__version__, True)]
    rows += [(f"extra {extra}: {package}", _version(package), True) for extra, package in EXTRAS]
    cuda = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
            else "none (training runs on the CPU)")
    rows += [("CUDA devices", cuda, True), ("CPU threads", f"torch uses {torch.get_num_threads()} "
                                                          f"(train.threads=0 keeps this)", True)]
    reason = toolchain.missing("cpu")
    rows.append(("C++ kernels / torch.compile on CPU", "build and load" if reason is None else
                 f"unavailable: {reason}; the compile switches fall back to torch's ops", True))
    root = stdlib_root()
    files = sum(1 for _ in root.glob("*.py")) if root.is_dir() else 0
    rows.append(("default corpus (stdlib)", f"{root}: {files} top-level .py files" if files else
                 f"not found at {root}: give data.sources", files > 0))
    configs = available_configs()
    rows.append(("configs", f"{len(configs)} in {PACKAGE_CONFIGS}", bool(configs)))
    return rows


def main() -> int:
    """Print the checks; exit 1 if one that a default run needs failed."""
    rows = checks()
    width = max(len(what) for what, _, _ in rows)
    for what, finding, ok in rows:
        print(f"{what:<{width}}  {finding}{'' if ok else '  <- PROBLEM'}")
    return 0 if all(ok for _, _, ok in rows) else 1
