"""Checkpoints: exact round trips, corruption and interruption handling, pruning, resume rules."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from nestlearn.train import checkpoint as ckpt
from nestlearn.train.checkpoint import (
    CheckpointError,
    checkpoint_dir_name,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 8, hidden: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, hidden)
        self.back = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.back(torch.relu(self.mid(self.emb(x)))))


Setup = tuple[TiedLM, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]


def make_setup(seed: int, steps: int = 0) -> Setup:
    torch.manual_seed(seed)
    model = TiedLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(steps):
        x = torch.randint(0, 11, (4, 5))
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def save(root: Path, step: int, setup: Setup, **kwargs: Any) -> Path:
    model, opt, sched = setup
    return save_checkpoint(
        root,
        step,
        model=model,
        optimizer=opt,
        scheduler=sched,
        trainer_state={"step": step, "tokens": 20 * step, "best_val": 1.5},
        config={"model": {"d_model": 8}},
        **kwargs,
    )


def test_dir_name() -> None:
    assert checkpoint_dir_name(100) == "step_000100"
    assert checkpoint_dir_name(1234567) == "step_1234567"


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path: Path) -> None:
    src = make_setup(seed=0, steps=3)
    memory = {"level0": torch.arange(6.0).reshape(2, 3), "clock": 7}
    path = save(tmp_path, 3, src, extra_tensors=memory)
    expected = (torch.rand(5), random.random(), np.random.rand())

    manifest = verify_checkpoint(path)
    assert manifest["step"] == 3 and manifest["format_version"] == ckpt.FORMAT_VERSION
    assert set(manifest["files"]) == set(ckpt.PAYLOAD_FILES)

    dst = make_setup(seed=1)
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)
    state = load_checkpoint(path, model=dst[0], optimizer=dst[1], scheduler=dst[2])

    assert torch.equal(torch.rand(5), expected[0])
    assert random.random() == expected[1]
    assert np.random.rand() == expected[2]
    for (name, a), b in zip(src[0].state_dict().items(), dst[0].state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert dst[0].head.weight is dst[0].emb.weight  # still tied after loading
    src_opt, dst_opt = src[1].state_dict(), dst[1].state_dict()
    assert src_opt["state"].keys() == dst_opt["state"].keys()
    for key, moments in src_opt["state"].items():
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[field], dst_opt["state"][key][field]), (key, field)
    assert dst[2].last_epoch == 3 and dst[2].get_last_lr() == src[2].get_last_lr()
    assert state["step"] == 3 and state["tokens"] == 60 and state["best_val"] == 1.5
    assert torch.equal(state["extra"]["level0"], memory["level0"])
    assert state["extra"]["clock"] == 7
    assert json.loads((path / "config.json").read_text()) == {"model": {"d_model": 8}}


def test_resumed_training_matches_uninterrupted(tmp_path: Path) -> None:
    straight = make_setup(seed=0, steps=2)
    path = save(tmp_path, 2, straight)
    _continue(straight, 2)
    resumed = make_setup(seed=5)
    load_checkpoint(path, model=resumed[0], optimizer=resumed[1], scheduler=resumed[2])
    _continue(resumed, 2)
    for a, b in zip(straight[0].parameters(), resumed[0].parameters(), strict=True):
        assert torch.equal(a, b)


def _continue(setup: Setup, steps: int) -> None:
    model, opt, sched = setup
    for _ in range(steps):
        x = torch.randint(0, 11, (4, 5))  # consumes the restored RNG
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_optimizer_file_loads_with_weights_only(tmp_path: Path) -> None:
    path = save(tmp_path, 1, make_setup(seed=0, steps=1), extra_tensors={"m": torch.ones(2)})
    blob = torch.load(path / "optimizer.pt", weights_only=True)
    assert set(blob) == {"optimizer", "scheduler", "extra"}
    assert blob["scheduler"]["last_epoch"] == 1
    rng = torch.load(path / "rng.pt", weights_only=True)
    assert set(rng) >= {"python", "numpy", "torch"}


class Opaque:
    """Picklable, but not a tensor or number: `weights_only=True` would refuse it at resume."""


def test_state_needing_pickle_is_refused_at_save(tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointError,
        match=r"optimizer\.pt holds objects other than tensors and numbers: .*Opaque",
    ):
        save(tmp_path, 1, make_setup(seed=0), extra_tensors={"bad": Opaque()})
    assert list(tmp_path.iterdir()) == []


def test_corrupted_file_fails_verify_and_latest_falls_back(tmp_path: Path) -> None:
    setup = make_setup(seed=0, steps=1)
    first = save(tmp_path, 1, setup)
    second = save(tmp_path, 2, setup)
    weights = second / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    with pytest.raises(
        CheckpointError, match=r"step_000002: model.safetensors does not match its sha256"
    ):
        verify_checkpoint(second)
    warnings: list[str] = []
    assert latest_valid_checkpoint(tmp_path, warn=warnings.append) == first
    assert len(warnings) == 1 and "step_000002" in warnings[0]
    assert resolve_resume(tmp_path, "auto") == first


@pytest.mark.parametrize("damage", ["delete_manifest", "delete_file", "truncate", "bad_version"])
def test_incomplete_or_foreign_checkpoints_fail_verify(tmp_path: Path, damage: str) -> None:
    path = save(tmp_path, 1, make_setup(seed=0))
    if damage == "delete_manifest":
        (path / "manifest.json").unlink()
    elif damage == "delete_file":
        (path / "rng.pt").unlink()
    elif damage == "truncate":
        (path / "optimizer.pt").write_bytes((path / "optimizer.pt").read_bytes()[:10])
    else:
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["format_version"] = 99
        (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert latest_valid_checkpoint(tmp_path, warn=lambda _: None) is None


def test_interrupted_save_leaves_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = make_setup(seed=0, steps=1)
    first = save(tmp_path, 1, setup)

    def crash() -> dict[str, Any]:  # after the weights and optimizer files are written
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "capture_rng_state", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, setup, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]
    verify_checkpoint(first)
    assert latest_valid_checkpoint(tmp_path) == first


def test_leftover_temp_dirs_are_not_checkpoints(tmp_path: Path) -> None:
    first = save(tmp_path, 1, make_setup(seed=0))
    (tmp_path / ".step_000002.abc.tmp").mkdir()
    (tmp_path / "notes").mkdir()
    assert list_checkpoints(tmp_path) == [first]
    assert list_checkpoints(tmp_path / "missing") == []


def test_keep_prunes_older_checkpoints(tmp_path: Path) -> None:
    setup = make_setup(seed=0)
    for step in (5, 10, 15, 20):
        save(tmp_path, step, setup, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000015", "step_000020"]
    save(tmp_path, 25, setup, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000025"]
    save(tmp_path, 30, setup)  # keep=0 keeps all
    assert len(list_checkpoints(tmp_path)) == 2


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    save(tmp_path, 1, make_setup(seed=0))
    path = save(tmp_path, 1, make_setup(seed=1), keep=1)
    model = TiedLM()
    load_checkpoint(path, model=model)
    assert torch.equal(model.mid.weight, make_setup(seed=1)[0].mid.weight)


def test_resolve_resume(tmp_path: Path) -> None:
    assert resolve_resume(tmp_path / "empty", "auto") is None
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "none") is None
    path = save(tmp_path / "ckpt", 7, make_setup(seed=0))
    assert resolve_resume(tmp_path / "ckpt", str(path)) == path
    assert resolve_resume(tmp_path / "ckpt", "step_000007") == path
    assert resolve_resume(tmp_path / "ckpt", "auto") == path
    other = tmp_path / "not_a_checkpoint"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"no manifest\.json"):
        resolve_resume(tmp_path, str(other))
    with pytest.raises(CheckpointError, match="not a directory"):
        resolve_resume(tmp_path, str(tmp_path / "nowhere"))


def test_loading_into_a_different_model_is_a_clear_error(tmp_path: Path) -> None:
    path = save(tmp_path, 1, make_setup(seed=0))
    renamed = nn.ModuleDict({"emb": nn.Embedding(11, 8), "other": nn.Linear(8, 8)})
    with pytest.raises(CheckpointError, match=r"missing \[other.bias, other.weight\]"):
        load_checkpoint(path, model=renamed)
    wider = TiedLM(hidden=16)
    with pytest.raises(CheckpointError, match=r"weights do not fit the model: .*size mismatch"):
        load_checkpoint(path, model=wider)


def test_scheduler_requested_but_not_saved(tmp_path: Path) -> None:
    model, opt, sched = make_setup(seed=0)
    path = save_checkpoint(
        tmp_path,
        1,
        model=model,
        optimizer=opt,
        scheduler=None,
        trainer_state={"step": 1},
        config={},
    )
    with pytest.raises(CheckpointError, match="no scheduler state"):
        load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    assert load_checkpoint(path, model=model, optimizer=opt, restore_rng=False) == {"step": 1}


def test_rotation_never_removes_the_last_valid_checkpoint_behind_a_bad_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setup = make_setup(seed=0)
    first = save(tmp_path, 1, setup, keep=1)
    real_manifest = ckpt.manifest

    def torn(directory: Path, step: int) -> dict[str, Any]:  # the weights are lost after hashing
        manifest = real_manifest(directory, step)
        (directory / ckpt.MODEL_FILE).write_bytes(b"torn")
        return manifest

    monkeypatch.setattr(ckpt, "manifest", torn)
    save(tmp_path, 2, setup, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001", "step_000002"]
    assert latest_valid_checkpoint(tmp_path, warn=lambda _: None) == first


class _Planted:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    setup = make_setup(seed=0, steps=1)
    path = save(tmp_path / "ckpt", 1, setup)
    marker = tmp_path / "ran"
    torch.save({"optimizer": _Planted(marker)}, path / ckpt.OPTIMIZER_FILE)
    # a manifest that matches the planted file: only the loader's own rules stand in the way
    (path / ckpt.MANIFEST_FILE).write_text(json.dumps(ckpt.manifest(path, 1)))
    verify_checkpoint(path)
    with pytest.raises(Exception, match=r"(?i)weights.only|unsupported|global"):
        load_checkpoint(path, model=TiedLM(), optimizer=setup[1])
    assert not marker.exists()
