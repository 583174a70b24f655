"""Data parallelism on PyTorch's own engine, DDP or FSDP2 (`fully_shard`), under `torchrun`.

Every process builds the same model from the same seed and draws the same global batch, of
which it trains on its own rows (`Parallel.rows`). With equal rows per rank, the mean of the
ranks' gradients is the single-process gradient of that batch, so a run's losses do not depend
on the world size. What decides anything (the NaN guard, the nested optimizers' controllers,
the level clocks) sees all-reduced figures or identical gradients, so the ranks stay in step;
only rank 0 writes files.

Checkpoints are consolidated by default (one `model.safetensors` and an optimizer state laid out
as a single process lays it out); under FSDP2, `parallel.sharded_checkpoints` lets each rank write
its own rows instead (`save_sharded_checkpoint`). Either layout resumes at any world size and
under any strategy.
"""

from __future__ import annotations

import atexit
import copy
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.nn.parallel import DistributedDataParallel

from nestlearn.config.schema import RunConfig
from nestlearn.train import sharded_checkpoint as sharded
from nestlearn.train.checkpoint import (
    CONFIG_FILE,
    MANIFEST_FILE,
    RNG_FILE,
    TRAINER_STATE_FILE,
    CheckpointError,
    checkpoint_dir_name,
    manifest,
    parameter_names,
    prune,
    read_model_state,
)
from nestlearn.utils.device import resolve_device
from nestlearn.utils.io import atomic_directory, atomic_write_json
from nestlearn.utils.seeding import capture_rng_state


@dataclass(frozen=True)
class Parallel:
    """This process's place in the job; the single-process default makes every method a no-op."""

    strategy: str = "none"  # none | ddp | fsdp
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(f"train.batch_size={batch_size} does not split evenly over {self.world_size} "
                             f"processes; use a multiple of {self.world_size} (it is the global batch)")

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a batch's rows (empty when the batch has fewer rows than ranks)."""
        return x.tensor_split(self.world_size)[self.rank] if self.world_size > 1 else x

    def _reduce(self, values: Sequence[float], op: dist.ReduceOp.RedOpType) -> list[float]:
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def total(self, values: Sequence[float]) -> list[float]:
        """Sums over the ranks."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def mean(self, values: Sequence[float]) -> list[float]:
        """Means over the ranks (the global-batch figure of per-rank means over equal rows)."""
        return [v / self.world_size for v in self.total(values)]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def share(self, text: str) -> str:
        """Rank 0's `text` on every rank (sent as bytes: nothing is unpickled)."""
        if self.world_size == 1:
            return text
        data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=self.device)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        dist.broadcast(size, 0)
        buffer = data if self.is_main else torch.empty(int(size), dtype=torch.uint8, device=self.device)
        dist.broadcast(buffer, 0)
        return bytes(buffer.cpu().tolist()).decode()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the body first (e.g. prepares the data), then the others (which reuse it)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def quiet(_: str) -> None:
    """The log of ranks other than 0."""


def setup(cfg: RunConfig) -> Parallel:
    """This process's `Parallel`, starting the process group on first use: from `torchrun`'s
    environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), or as a group of one without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = cfg.parallel.strategy
    device = resolve_device(cfg.train.device)
    if strategy == "none":
        if world > 1:
            raise ValueError(f"WORLD_SIZE={world} (started by torchrun?) but parallel.strategy=none; "
                             "set parallel.strategy=ddp or fsdp")
        return Parallel(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if "RANK" in os.environ:
            dist.init_process_group(backend, store=_attempt_store(), rank=int(os.environ["RANK"]), world_size=world)
        else:
            store = Path(tempfile.mkdtemp(prefix="nestlearn-pg-")) / "store"
            dist.init_process_group(backend, init_method=store.as_uri(), rank=0, world_size=1)
        atexit.register(_teardown)
    return Parallel(strategy, dist.get_rank(), dist.get_world_size(), device)


def _attempt_store() -> Store:
    """The store of torchrun's agent under a prefix of this attempt: after a restart, the
    `--standalone` agent's store still holds the previous attempt's addresses, which the new
    group would otherwise try to connect to."""
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=timedelta(minutes=10))
    return PrefixStore(f"nestlearn/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules FSDP2 shards one by one before the root: the model's `fsdp_units()` (its
    blocks, unless its forward reaches into them from outside), else none."""
    units = getattr(model, "fsdp_units", None)
    return list(units()) if callable(units) else []


@dataclass(frozen=True)
class FullState:
    """A state dict to save in an optimizer's place (`checkpoint.SavesState`)."""

    state: dict[str, Any]

    def state_dict(self) -> dict[str, Any]:
        return self.state


@dataclass
class Wrapped:
    """The module to train with, and, under FSDP on rank 0, an unsharded CPU copy that
    checkpoints are written from."""

    train_module: nn.Module
    sharded: bool = False
    replica: nn.Module | None = None


def wrap(model: nn.Module, par: Parallel) -> Wrapped:
    """DDP around the model, or FSDP2 applied in place (units, then the root)."""
    if par.strategy == "ddp":
        ids = [par.device.index] if par.device.type == "cuda" else None
        return Wrapped(DistributedDataParallel(model, device_ids=ids))
    if par.strategy == "fsdp":
        # Our blocks' outputs are never modified in place (the tests compare with one process).
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        replica = copy.deepcopy(model).cpu() if par.is_main else None
        for unit in shard_units(model):
            fully_shard(unit)
        fully_shard(model)
        return Wrapped(model, True, replica)
    return Wrapped(model)


def full_tensors(tree: Any) -> Any:
    """`tree` with every DTensor gathered whole onto the CPU (a collective: every rank calls it,
    with the same tree structure); other leaves as they are."""
    if isinstance(tree, DTensor):
        return tree.full_tensor().cpu()
    if isinstance(tree, dict):
        return {k: full_tensors(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(full_tensors(v) for v in tree)
    return tree


def full_model(model: nn.Module, wrapped: Wrapped) -> nn.Module:
    """A module holding the whole weights, to save: the model itself unless it is sharded, then
    rank 0's replica refreshed from a gathered state (a collective)."""
    if not wrapped.sharded:
        return model
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if wrapped.replica is not None:
        wrapped.replica.load_state_dict(state)
        return wrapped.replica
    return model  # not rank 0: nothing is written from here


def like_param(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out like `param`: sharded the same way when `param` is a DTensor."""
    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    return full.to(param.device)


def load_sharded_weights(path: Path, model: nn.Module) -> None:
    """Load a checkpoint's whole weights (either layout) into a sharded model, each rank keeping
    its shard."""
    state = read_model_state(path, model)
    try:
        set_model_state_dict(model, cast("dict[str, Any]", state), options=StateDictOptions(full_state_dict=True, strict=True))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(path, f"weights do not fit the model: {str(exc).splitlines()[0]}") from exc


def save_sharded_checkpoint(root: Path, step: int, *, par: Parallel, model: nn.Module,
                            optimizer: torch.optim.Optimizer, scheduler: Any, trainer_state: dict[str, Any],
                            config: dict[str, Any], keep: int, pending: dict[str, torch.Tensor]) -> Path:
    """Every rank writes its own shards into rank 0's temporary directory (`sharded_checkpoint`),
    then rank 0 adds the common files and the manifest and renames it into place. No gathering."""
    final = Path(root) / checkpoint_dir_name(step)
    aliases = _aliases(model)
    weights, model_rows = _local_rows({k: v for k, v in model.state_dict().items() if k not in aliases}, par)
    blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "extra": {"pending_grads": pending} if pending else None}
    flat, blob_rows = _local_rows(sharded.flatten(blob), par)
    index = {"model": model_rows, "blob": blob_rows, "aliases": aliases}

    def write_own(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / sharded.model_file(par.rank)))
        torch.save(sharded.unflatten(blob, flat), tmp / sharded.optimizer_file(par.rank))
        atomic_write_json(tmp / sharded.index_file(par.rank), index)

    if par.is_main:
        with atomic_directory(final) as tmp:
            par.share(str(tmp))
            write_own(tmp)
            par.barrier()  # every rank's files are written
            torch.save(capture_rng_state(), tmp / RNG_FILE)
            atomic_write_json(tmp / TRAINER_STATE_FILE, trainer_state)
            atomic_write_json(tmp / CONFIG_FILE, config)
            atomic_write_json(tmp / MANIFEST_FILE, manifest(tmp, step, par.world_size))
        prune(root, final, keep)
    else:
        write_own(Path(par.share("")))
        par.barrier()
    par.barrier()  # the checkpoint is in place before any rank goes on
    return final


def _aliases(model: nn.Module) -> dict[str, str]:
    """Names of a parameter shared under several names (a tied head), each to its first name."""
    return {alias: group[0] for group in parameter_names(model) for alias in group[1:]}


def _local_rows(tensors: dict[str, Any], par: Parallel) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Each DTensor replaced by this rank's rows (on the CPU) and the [start, stop) of those rows;
    other tensors kept on rank 0 only (they are the same on every rank), other values as they are."""
    local: dict[str, Any] = {}
    rows: dict[str, list[int]] = {}
    for name, value in tensors.items():
        if isinstance(value, DTensor):
            if tuple(value.placements) != (Shard(0),):
                raise ValueError(f"sharded checkpoints hold tensors sharded on dim 0; {name} is {value.placements}")
            piece = value.to_local().detach().cpu()
            chunk = -(-value.shape[0] // par.world_size)  # FSDP2 shards like torch.chunk
            start = min(par.rank * chunk, value.shape[0])
            if piece.shape[0] != min(chunk, value.shape[0] - start):
                raise ValueError(f"{name}: rank {par.rank} holds {piece.shape[0]} rows, not torch.chunk's share")
            local[name], rows[name] = piece, [start, start + piece.shape[0]]
        elif torch.is_tensor(value):
            if par.is_main:
                local[name] = value.detach().cpu()
        else:
            local[name] = value
    return local, rows


def optimizer_context(par: Parallel) -> AbstractContextManager[object]:
    """Under FSDP, an optimizer step may mix the sharded parameters with plain tensors it makes
    itself (a controller's multipliers, a step size): those count as replicated on every rank.
    Reductions over a sharded tensor (norms, Newton-Schulz products) are DTensor operations, so
    they span the whole tensor, not one shard."""
    return implicit_replication() if par.strategy == "fsdp" else nullcontext()


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading a whole optimizer state: each per-parameter tensor of a sharded parameter's
    shape is laid out like the parameter."""
    for param, state in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for key, value in state.items():
            if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == param.shape:
                state[key] = like_param(value, param)
