"""DistributedDataParallel plumbing: process-group setup from torchrun's environment, rank
helpers that also work without ``torch.distributed``, and object gathering.

``torchrun --nproc_per_node=K train/joint.py ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``; :func:`init_distributed` then joins the group (NCCL on CUDA, gloo on CPU) and
picks this process's device. Each process reads its own share of every batch (the global
batch is ``--batch-size``, split evenly), DDP averages the gradients, and rank 0 alone writes
files.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    #: whether a CRF trained in this process keeps its marginals for the backward (see
    #: train.process.keep_large_blocks_in_the_heap)
    keep_marginals: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def log(msg: str):
    """Print on rank 0 only."""
    if is_main_process():
        print(msg, flush=True)


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:LOCAL_RANK`` when a GPU is present, else CPU; ``"cpu"``; ``"cuda"``
    (``ValueError`` without a GPU); or an explicit ``"cuda:K"``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} asked for, but no CUDA GPU is available")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:K, got {name!r}")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1) and choose the
    device. Without torchrun: a single process, nothing initialised."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup(finished: bool = False):
    """Leave the process group (if any). ``finished``: every process ended its work normally,
    so they first wait for each other (a barrier would hang after one of them failed).

    Why the care: DistributedDataParallel's hooks hold the group through reference cycles, so
    without a collection its gloo threads could outlive ``destroy_process_group`` and be torn
    down with the interpreter, which aborts the process ("terminate called without an active
    exception"); and a process that leaves while another still runs closes connections under it."""
    if not is_initialized():
        return
    if finished:
        barrier()
    gc.collect()
    dist.destroy_process_group()


def barrier():
    if is_initialized() and get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (a one-element list without distributed)."""
    if not is_initialized() or get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_initialized() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_true(flag: bool, device=None) -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    if not is_initialized() or get_world_size() == 1:
        return bool(flag)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """Wrap in DistributedDataParallel when running in a group of more than one process."""
    if not info.distributed:
        return model
    if not any(p.requires_grad for p in model.parameters()):
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
