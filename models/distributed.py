"""Data-parallel online training: the collectives the trainer needs, around torch DistributedDataParallel.

Each rank consumes its own partitions of the samples topic (static assignment, ``p % world == rank``)
and trains the same models wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`. A stream
is uneven: in a given step one rank may hold a full batch and another nothing. DDP needs every rank
to run forward/backward the same number of times, so every loop iteration starts with one collective
(:meth:`DistContext.agree`) in which the ranks exchange how many samples they hold, whether they were
asked to stop, whether they are idle and their consumer lag. Then, when any rank holds samples, all
ranks take one step together; a rank without samples steps on a one-row placeholder batch with loss
weight 0. The local loss is weighted ``world · n_rank / n_total``, so DDP's gradient *average* is the
gradient of the mean loss over the union of the ranks' samples (:func:`loss_weight`).

What DDP does not synchronise, this module does:

* **buffers** (running BatchNorm/Dice statistics, DIN's mini-batch-aware L2 id counts) are merged after
  every step by one all-reduce of their changes (:func:`sync_buffers`): statistics move by the
  sample-weighted mean of the ranks' updates, counts by the sum (a placeholder step contributes
  nothing). Batch statistics *inside* a step stay per rank (local BatchNorm, as DDP without
  SyncBatchNorm; the models' BatchNorm is hand-written, so ``SyncBatchNorm.convert_sync_batchnorm``
  would not apply anyway);
* **metrics**: rank 0 gathers every rank's progressive predictions, so its metric window, MLflow
  metrics and promotion decisions are over the union of all ranks' samples (:meth:`gather`);
* **decisions** (promotion, the initial champion) are rank 0's, broadcast to the others;
* a **weight check**: at every registry checkpoint the ranks compare a SHA-256 of their weights and
  buffers (:func:`state_digest`) and stop with an error if they ever differ.

Crash-safe state is written per rank as *generations* (:func:`state_file`): every rank writes its
file for generation ``g``, all ranks pass a barrier, and only then delete older generations. On
restart the ranks resume from the newest generation that every rank has (:func:`common_generation`),
so a crash between two ranks' writes can never pair one rank's model with another's older offsets.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models.features import Batch, FeatureSpec, build_batch
from pipeline.config import TrainerSettings
from pipeline.exceptions import ConfigError
from pipeline.state import empty_behaviors

__all__ = ["Agreement", "DistContext", "common_generation", "init_distributed", "list_generations", "loss_weight",
           "placeholder_batch", "snapshot_buffers", "state_digest", "state_file", "sync_buffers"]

log = logging.getLogger(__name__)

_STATE_RE = re.compile(r"^state-rank(\d+)-of(\d+)-g(\d+)\.pt$")


@dataclass(frozen=True)
class Agreement:
    """What all ranks agreed on at the start of one loop iteration (identical on every rank)."""

    counts: tuple[int, ...]  # samples each rank holds for this step (index = rank)
    stop: bool  # some rank was asked to stop (SIGTERM/SIGINT): everyone stops after this step
    idle: bool  # every rank has been idle past --exit-when-idle: everyone exits
    lag: float  # consumer lag summed over the ranks' partitions

    @property
    def total(self) -> int:
        return sum(self.counts)


@dataclass
class DistContext:
    """This process's place in the data-parallel group (``world == 1``: no process group, no collectives)."""

    rank: int = 0
    world: int = 1
    backend: str = "none"
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def agree(self, n_local: int, stop: bool, idle: bool, lag: float) -> Agreement:
        """One all-gather of (samples held, stop, idle, lag) from every rank."""
        if not self.enabled:
            return Agreement((n_local,), stop, idle, lag)
        mine = torch.tensor([float(n_local), float(stop), float(idle), -1.0 if lag != lag else lag],
                            dtype=torch.float64, device=self.comm_device)  # lag -1: unknown
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        rows = torch.stack(parts).cpu().tolist()
        lags = [r[3] for r in rows]
        return Agreement(counts=tuple(int(r[0]) for r in rows), stop=any(r[1] > 0 for r in rows),
                         idle=all(r[2] > 0 for r in rows),
                         lag=float("nan") if min(lags) < 0 else float(sum(lags)))

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DDP (or as is for one process).

        ``find_unused_parameters=True``: which parameters take part depends on the batch (DiffuMIN's
        contrastive head is skipped for a one-row batch), and it may differ between ranks in the same
        step. No buffer broadcast before each forward: buffers are merged by :func:`sync_buffers`
        instead of being overwritten with rank 0's.
        """
        if not self.enabled:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp: Any = nn.parallel.DistributedDataParallel  # keyword names differ across torch versions
        wrapped: nn.Module = ddp(module, device_ids=ids, find_unused_parameters=True,
                                 **_no_forward_buffer_sync())
        return wrapped

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order); None elsewhere."""
        if not self.enabled:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_root else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_root else None]
        dist.broadcast_object_list(box, src=0, device=self.comm_device)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP keyword that turns off the per-forward buffer broadcast (renamed in newer torch; both keep
    the one-time sync of parameters and buffers from rank 0 at construction)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def init_distributed(s: TrainerSettings) -> DistContext:
    """Join the process group described by the settings (``--world-size/--rank/--dist-init`` or the
    ``WORLD_SIZE/RANK/LOCAL_RANK/MASTER_ADDR/MASTER_PORT`` variables torchrun sets)."""
    if s.world_size == 1:
        return DistContext()
    backend = s.dist_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("--dist-backend nccl needs a CUDA device; use gloo on CPU")
        device = torch.device("cuda", s.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    init = s.dist_init or "env://"
    log.info("rank %d/%d joining %s over %s", s.rank, s.world_size, init, backend)
    dist.init_process_group(backend, init_method=init, rank=s.rank, world_size=s.world_size,
                            timeout=timedelta(seconds=s.dist_timeout_s))
    return DistContext(rank=s.rank, world=s.world_size, backend=backend, device=device)


def loss_weight(counts: tuple[int, ...], rank: int) -> float:
    """Factor on this rank's mean loss so that DDP's gradient average over ``len(counts)`` ranks is the
    gradient of the mean loss over all ``sum(counts)`` samples (0 for a rank without samples)."""
    return len(counts) * counts[rank] / max(1, sum(counts))


def placeholder_batch(spec: FeatureSpec) -> Batch:
    """One candidate with an empty history: what a rank without samples steps on (loss weight 0)."""
    return build_batch([empty_behaviors()], [1], [1], spec)


def _tracked_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Floating-point buffers that are part of the state (running statistics, id counts); the
    non-persistent ones are constants derived from the config."""
    persistent = set(module.state_dict().keys())
    return [(n, b) for n, b in module.named_buffers() if n in persistent and b.is_floating_point()]


def snapshot_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for _, b in _tracked_buffers(module)]


def sync_buffers(ctx: DistContext, module: nn.Module, before: list[torch.Tensor], n_local: int,
                 n_total: int) -> None:
    """Merge the buffer updates of one step across ranks (one all-reduce), identically on every rank.

    Buffers named ``*counts`` are additive (DIN's mini-batch-aware L2 occurrence counts): they move by
    the sum of the ranks' increments. Every other buffer is a running statistic: it moves by the
    sample-weighted mean of the ranks' updates, ``Σ_r (n_r / N) · Δ_r``. A rank that stepped on a
    placeholder batch (``n_local == 0``) contributes nothing. Buffers that no rank changed come out
    bit-identical (``x + 0.0``).
    """
    if not ctx.enabled:
        return
    bufs = _tracked_buffers(module)
    if not bufs:
        return
    frac = n_local / max(1, n_total)
    dtype = functools.reduce(torch.promote_types, [b.dtype for _, b in bufs])  # float32 here: half the bytes of f64
    deltas = []
    for (name, b), old in zip(bufs, before, strict=True):
        w = float(n_local > 0) if name.endswith("counts") else frac
        deltas.append(((b.detach() - old) * w).reshape(-1).to(dtype))
    flat = torch.cat(deltas).to(ctx.comm_device)
    dist.all_reduce(flat)
    flat = flat.to(before[0].device)
    i = 0
    with torch.no_grad():
        for (_, b), old in zip(bufs, before, strict=True):
            n = b.numel()
            b.copy_((old.to(dtype) + flat[i:i + n].view_as(old)).to(b.dtype))
            i += n


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every entry of a ``state_dict`` (names in sorted order, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_file(directory: Path, rank: int, world: int, generation: int) -> Path:
    return directory / f"state-rank{rank}-of{world}-g{generation:09d}.pt"


def list_generations(directory: Path, rank: int, world: int) -> tuple[list[int], list[int]]:
    """(generations of this rank for this world size, world sizes of any other state files found)."""
    gens, other = [], []
    if directory.exists():
        for p in directory.iterdir():
            m = _STATE_RE.match(p.name)
            if not m:
                continue
            r, w, g = (int(x) for x in m.groups())
            if w != world:
                other.append(w)
            elif r == rank:
                gens.append(g)
    return sorted(gens), sorted(set(other))


def common_generation(per_rank: list[list[int]]) -> int | None:
    """The newest generation every rank holds; None when no rank holds any.

    Raises :class:`ConfigError` when some ranks hold state but no generation is common (the ranks'
    checkpoint directories do not belong to the same run).
    """
    if not any(per_rank):
        return None
    common = set(per_rank[0]).intersection(*map(set, per_rank[1:]))
    if not common:
        raise ConfigError(f"the ranks' crash-safe states share no generation ({per_rank}); they do not "
                          "come from the same run: use a fresh --checkpoint-dir on every rank")
    return max(common)
