"""Process-group setup for ``torchrun`` and the few collectives the trainers need.

``init_distributed(device)`` reads the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``; ``MASTER_ADDR``/``MASTER_PORT`` are read by torch itself). With ``WORLD_SIZE > 1`` it
initializes the default process group (NCCL when the device is CUDA, gloo otherwise) and, on CUDA, binds
the process to ``cuda:LOCAL_RANK``. Without those variables it is a single process (world size 1) and
every collective below is a no-op, so the same training code runs with ``python -m`` and with
``torchrun``::

    ctx = init_distributed(cfg.device)          # DistContext(rank, world_size, local_rank, device, ...)
    model.to(ctx.device)
    feats = ctx.gather_features(local_feats)    # (sum of all ranks' B_r, D), in rank order
    loss_avg = ctx.all_reduce_mean(loss.item())
    rng_per_rank = ctx.all_gather_object(get_rng_state())   # [state_rank0, state_rank1, ...]
    if ctx.is_main:
        save(...)
    ctx.cleanup()

The module-level functions (``gather_features``, ``all_reduce_mean``, ``all_gather_object``,
``broadcast_object``, ``barrier``, ``get_rank``, ``get_world_size``, ``is_main_process``) do the same on whatever default process group exists, and
are safe without one; the rank queries and the gather itself are :mod:`xbn_queue.distributed`'s.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Optional, Union, overload

import torch
import torch.distributed as dist

from xbn_queue.distributed import all_gather_list, comm_device, get_rank, get_world_size, has_process_group
from xbn_queue.training.seeding import resolve_device

__all__ = [
    "DistContext",
    "init_distributed",
    "gather_features",
    "all_reduce_mean",
    "all_gather_object",
    "broadcast_object",
    "barrier",
    "cleanup",
    "get_rank",
    "get_world_size",
    "is_main_process",
]


def is_main_process() -> bool:
    """True on rank 0 (and without a process group)."""
    return get_rank() == 0


def barrier() -> None:
    """Synchronize all ranks; no-op at world size 1."""
    if has_process_group() and dist.get_world_size() > 1:
        dist.barrier()


def gather_features(t: torch.Tensor, keep_local_grad: bool = False) -> torch.Tensor:
    """Concatenate ``t`` from all ranks along dim 0, in rank order.

    Ranks may hold different numbers of rows: the sizes are all-gathered first, every rank pads to the
    largest, and the padding is trimmed after the all-gather. At world size 1 ``t`` is returned as is.

    Args:
        t: ``(B_r, ...)`` on this rank; same trailing shape and dtype on every rank.
        keep_local_grad: If True, this rank's slice of the result is ``t`` itself, so gradients flow
            to the local rows (the other ranks' rows never carry gradient). Otherwise the result is
            detached.

    Returns:
        ``(sum_r B_r, ...)`` on ``t``'s device.

    Raises:
        ValueError: If ``t`` is 0-dimensional.
    """
    if t.dim() == 0:
        raise ValueError("gather_features needs a tensor with at least one dimension (rows along dim 0)")
    if get_world_size() == 1:
        return t if keep_local_grad else t.detach()
    parts = all_gather_list(t)
    if keep_local_grad:
        parts[get_rank()] = t
    return torch.cat(parts, dim=0)  # (sum_r B_r, ...)


@overload
def all_reduce_mean(x: float) -> float: ...
@overload
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor: ...
def all_reduce_mean(x: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
    """Average a number or a tensor over all ranks (a new value; the input is not modified).

    Args:
        x: A Python number, or a tensor of the same shape on every rank.

    Returns:
        A float for a number input, else a tensor of ``x``'s shape, dtype and device (integer tensors
        are averaged in float64 and returned as float64). At world size 1 the value itself.
    """
    world = get_world_size()
    if isinstance(x, torch.Tensor):
        if world == 1:
            return x.detach().clone()
        comm = comm_device(x.device)
        dtype = x.dtype if x.is_floating_point() else torch.float64
        buf = x.detach().to(device=comm, dtype=dtype).clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return (buf / world).to(x.device)
    value = float(x)
    if world == 1:
        return value
    comm = comm_device(torch.device("cpu"))
    buf = torch.tensor([value], dtype=torch.float64, device=comm)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return float(buf.item()) / world


def all_gather_object(obj: Any) -> list[Any]:
    """Collect one picklable object from every rank, in rank order (e.g. per-rank RNG states).

    Args:
        obj: Any picklable object.

    Returns:
        ``[obj_rank0, obj_rank1, ...]`` on every rank; ``[obj]`` at world size 1.
    """
    world = get_world_size()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank ``src`` to every rank (e.g. a decision made on rank 0).

    Args:
        obj: The object (only ``src``'s value matters).
        src: The sending rank.

    Returns:
        ``src``'s object on every rank; ``obj`` itself at world size 1.
    """
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Destroy the default process group if one exists."""
    if has_process_group():
        dist.destroy_process_group()


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run.

    Attributes:
        rank: Global rank (0 for a single process).
        world_size: Number of processes.
        local_rank: Rank on this node (the CUDA device index under ``torchrun``).
        device: The device this process computes on.
        backend: ``"nccl"``, ``"gloo"``, or ``None`` for a single process.
        owns_group: True if :func:`init_distributed` created the process group (``cleanup`` then
            destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0: the process that writes checkpoints, metrics and W&B."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Synchronize all ranks; no-op at world size 1."""
        barrier()

    def gather_features(self, t: torch.Tensor, keep_local_grad: bool = False) -> torch.Tensor:
        """See :func:`gather_features`."""
        return gather_features(t, keep_local_grad=keep_local_grad)

    def all_reduce_mean(self, x: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
        """See :func:`all_reduce_mean`."""
        return all_reduce_mean(x)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """See :func:`all_gather_object`."""
        return all_gather_object(obj)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """See :func:`broadcast_object`."""
        return broadcast_object(obj, src=src)

    def cleanup(self) -> None:
        """Destroy the process group if this context created it."""
        if self.owns_group:
            cleanup()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value != "" else default
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from err


def _local_cuda_device(local_rank: int) -> torch.device:
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible")
    return torch.device("cuda", local_rank)


def init_distributed(
    device: Union[str, torch.device] = "auto",
    backend: Optional[str] = None,
    timeout: Optional[datetime.timedelta] = None,
) -> DistContext:
    """Set up this process for single-process or ``torchrun`` training.

    Args:
        device: ``--device`` value (``"auto"``, ``"cpu"``, ``"cuda"``, ...). Under several processes on
            CUDA, the process uses ``cuda:LOCAL_RANK``.
        backend: Force a backend; default NCCL for CUDA, gloo otherwise.
        timeout: Process-group timeout (torch's default when ``None``).

    Returns:
        The :class:`DistContext`. If a default process group already exists it is reused (and not
        destroyed by ``cleanup``).

    Raises:
        ValueError: If the device is unavailable, the environment is inconsistent, or ``LOCAL_RANK``
            has no matching CUDA device.
    """
    dev = resolve_device(device)
    if has_process_group():
        rank, world, owns = dist.get_rank(), dist.get_world_size(), False
        local_rank = _env_int("LOCAL_RANK", rank)
        backend = dist.get_backend()
    else:
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", 0)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"inconsistent distributed environment: RANK={rank}, WORLD_SIZE={world}")
        owns = False
        if world > 1:
            if not dist.is_available():
                raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            if dev.type == "cuda":
                dev = _local_cuda_device(local_rank)
                torch.cuda.set_device(dev)
            backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
            kwargs = {"timeout": timeout} if timeout is not None else {}
            dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
            owns = True
        else:
            backend = None
    if dev.type == "cuda" and world > 1 and not owns:
        dev = _local_cuda_device(local_rank)
        torch.cuda.set_device(dev)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend, owns_group=owns)
