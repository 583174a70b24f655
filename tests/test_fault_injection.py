"""Processes killed with SIGKILL, as a machine or a scheduler kills them: a worker of a torchrun
job mid-run (the job restarts and resumes from its last checkpoint) and a run in the middle of
writing a checkpoint (the previous checkpoint stays resumable). Flipped bytes and non-finite
losses are tested with the checkpoints (test_checkpoint.py) and the trainer (test_trainer.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_overrides
from nestlearn import pipeline
from nestlearn.config import load_config
from nestlearn.train.checkpoint import MODEL_FILE, checkpoint_dir_name, list_checkpoints
from nestlearn.train.distributed import quiet

pytestmark = pytest.mark.usefixtures("one_thread")


def run_overrides(root: Path, name: str, steps: int, *extra: str) -> list[str]:
    return [*tiny_overrides(root), f"out_dir={root / 'runs'}", f"name={name}", f"train.steps={steps}",
            "train.batch_size=4", "train.ckpt_every=4", "train.keep_checkpoints=0", "train.eval_every=1000",
            "train.eval_batches=1", "train.log_every=1", "train.threads=1", *extra]


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / checkpoint_dir_name(step) / MODEL_FILE))


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc, so no extra package)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture
def root(tmp_path: Path, tiny_root: Path, tiny_prepared: Any) -> Path:
    (tmp_path / "artifacts").symlink_to(tiny_root / "artifacts")  # the prepared data, shared
    return tmp_path


def launch(root: Path, name: str, steps: int, *flags: str) -> subprocess.Popen[str]:
    spec = root / f"{name}.json"
    spec.write_text(json.dumps([{"config": "transformer/pilot_smoke", "resume": "auto",
                                 "overrides": run_overrides(root, name, steps, "parallel.strategy=ddp")}]))
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *flags,
         str(REPO / "tests" / "workers" / "train_cases.py"), str(spec)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_killed_worker_restarts_the_job_which_resumes_from_its_last_checkpoint(root: Path) -> None:
    steps = 40
    reference = launch(root, "uninterrupted", steps)
    assert reference.wait(timeout=600) == 0, reference.communicate()[0][-3000:]
    job = launch(root, "killed", steps, "--max-restarts=1")
    run_dir = root / "runs" / "killed"
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / checkpoint_dir_name(4)).exists():
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.02)
    workers = children(job.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    killed_at = len(list_checkpoints(run_dir / "checkpoints"))
    output = job.communicate(timeout=600)[0]
    assert job.returncode == 0, output[-3000:]
    assert killed_at < steps // 4, "the kill came after the last checkpoint: nothing was tested"
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == steps
    expected, got = final_weights(root / "runs" / "uninterrupted", steps), final_weights(run_dir, steps)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)


KILL_IN_SECOND_SAVE = """
import os, signal, sys
from nestlearn import pipeline
from nestlearn.config import load_config
from nestlearn.train import checkpoint
saves, capture = [0], checkpoint.capture_rng_state
def dying_capture():  # the weights and optimizer state of the save are on disk by now
    saves[0] += 1
    if saves[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return capture()
checkpoint.capture_rng_state = dying_capture
cfg = load_config("transformer/pilot_smoke", sys.argv[1:])
pipeline.train(cfg, pipeline.prepare(cfg, log=lambda _: None), resume="none", log=lambda _: None)
"""


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(root: Path) -> None:
    steps = 12
    overrides = run_overrides(root, "killed", steps)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_IN_SECOND_SAVE), *overrides],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    checkpoints = root / "runs" / "killed" / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == [checkpoint_dir_name(4)]
    assert any(p.name.startswith(".") for p in checkpoints.iterdir())  # the half-written one, hidden
    cfg = load_config("transformer/pilot_smoke", overrides)
    run_dir, final = pipeline.train(cfg, pipeline.prepare(cfg, log=quiet), resume="auto", log=quiet)
    assert final["step"] == steps
    reference = load_config("transformer/pilot_smoke", run_overrides(root, "uninterrupted", steps))
    reference_dir, _ = pipeline.train(reference, pipeline.prepare(reference, log=quiet), resume="none", log=quiet)
    expected, got = final_weights(reference_dir, steps), final_weights(run_dir, steps)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
