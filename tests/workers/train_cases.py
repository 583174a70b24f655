"""Started by `torchrun` from tests/test_distributed.py: trains each case of a JSON list (config
name, overrides, resume) in turn, so that one launch covers many cases."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nestlearn import pipeline
from nestlearn.config import load_config
from nestlearn.train.distributed import quiet


def main(spec: Path) -> None:
    for case in json.loads(spec.read_text()):
        cfg = load_config(case["config"], case["overrides"])
        pipeline.train(cfg, pipeline.prepare(cfg, log=quiet), resume=case.get("resume", "none"), log=quiet)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
