"""Several processes, one result: torch.distributed collectives for sharded calibration and evaluation.

Launch any entry point under `torchrun --nproc-per-node N` (add `--nnodes`, `--node-rank`, `--rdzv-*` or
`--master-addr/--master-port` across nodes); `init_from_env` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR and joins the group (gloo on CPU, NCCL with one GPU per local rank). Each rank then takes its
`shard` of the windows or items, accumulates plain sums (second moments, NLL, hit counts), and
`all_reduce_sum_` adds them across ranks, so every rank sees the global sums: the eigendecompositions, and so
the rotations, are those of one process over all the data, up to float64 summation order. Without a process
group (the ordinary single-process case) every function here is a no-op or returns the trivial answer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from hooks.stats import SecondMoment
from mechslice.errors import MechsliceError

T = TypeVar("T")
S = TypeVar("S", bound=Sequence | torch.Tensor)

# A rank that waits longer than this at a collective is stuck (another rank died or diverged): fail, not hang.
TIMEOUT = timedelta(minutes=30)


def launched() -> bool:
    """True when the environment says this process is one of several (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device_type: str) -> str:
    """The collective backend for tensors on `device_type`: NCCL for CUDA, gloo for everything else."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_from_env() -> bool:
    """Join the process group torchrun describes (no-op without WORLD_SIZE > 1); True when one is joined.

    With CUDA each process takes GPU LOCAL_RANK, so `--device cuda` (the default) means its own GPU.
    """
    if not launched():
        return False
    if dist.is_initialized():
        return True
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise MechsliceError(
            f"WORLD_SIZE > 1 but {', '.join(missing)} not set; launch with torchrun --nproc-per-node N"
        )
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend_for(device_type), timeout=TIMEOUT)
    return True


def shutdown(wait: bool = True) -> None:
    """Leave the process group, after a last barrier (`wait`) so no rank exits while another still needs it."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on rank 0, the one process that writes files and prints results."""
    return rank() == 0


def shard(items: S, of: int | None = None, at: int | None = None) -> S:
    """Rank `at`'s contiguous share of `items` (a sequence or a tensor's first axis) among `of` ranks.

    Rank r gets items [r n / W, (r+1) n / W): shares differ in size by at most one, keep the original order,
    and their concatenation over ranks is `items`. Contiguous rather than strided so that each rank reads one
    block of windows (and batches of similar items stay together). Defaults: this process among all.
    """
    of = world_size() if of is None else of
    at = rank() if at is None else at
    n = len(items)
    return items[at * n // of : (at + 1) * n // of]


def _comm_device(tensor: Tensor) -> torch.device:
    """Where a tensor must be for the group's backend: NCCL reduces on this rank's GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum `tensor` over all ranks, in place (same dtype, same device); a no-op when not distributed."""
    if not active():
        return tensor
    where = _comm_device(tensor)
    if tensor.device == where:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    staged = tensor.to(where)
    dist.all_reduce(staged, op=dist.ReduceOp.SUM)
    tensor.copy_(staged)
    return tensor


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite `tensor` on every rank with rank `src`'s value, in place; a no-op when not distributed."""
    if not active():
        return tensor
    where = _comm_device(tensor)
    staged = tensor if tensor.device == where else tensor.to(where)
    dist.broadcast(staged, src)
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor


def sum_counts(*values: float) -> tuple[float, ...]:
    """Scalar sums (NLL totals, token or hit counts) added over ranks in float64 (integers exact below 2^53)."""
    packed = torch.tensor(values, dtype=torch.float64)
    return tuple(all_reduce_sum_(packed).tolist())


def reduce_moment_(stats: SecondMoment) -> SecondMoment:
    """Replace a rank's `SecondMoment` by the sum over ranks (float64 sum and token count), in place."""
    if active():
        all_reduce_sum_(stats.sum)
        (count,) = sum_counts(stats.count)
        stats.count = int(count)
    return stats


def barrier() -> None:
    """Wait until every rank arrives; a no-op when not distributed."""
    if active():
        dist.barrier()


def on_main(write: Callable[[], T]) -> T | None:
    """Run `write` (a file write) on rank 0 only, then hold every rank at a barrier until it is done.

    Rank 0 gets write's result, the others None. The barrier runs even when `write` raises, so the other ranks
    are released and the error surfaces on rank 0 (torchrun then stops the job).
    """
    try:
        return write() if is_main() else None
    finally:
        barrier()
