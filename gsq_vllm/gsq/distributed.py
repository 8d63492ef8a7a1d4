"""Data-parallel GSQ across processes (``torchrun``): every helper is a no-op in one process.

Each process holds its own shard of the calibration data. GSQ stays identical on every rank
because everything that decides a step is agreed on: Hessians and token counts are summed, the
gradient of each step is averaged (the Gumbel noise is seeded by step, so every rank samples the
same soft weights), the losses that decide whether a result is kept are summed, and the codes and
scales of each result are broadcast from rank 0. Plain ``torch.distributed``: gloo on CPUs, NCCL
on GPUs, whatever process group the caller initialised.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = ["world_size", "rank", "all_reduce_sum", "reduce_gradients", "broadcast_from_first", "barrier",
           "agreed_digest", "RankSharedParameters"]


def world_size() -> int:
    """Processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def _in_place(tensor: torch.Tensor, collective) -> None:
    """Run ``collective`` on ``tensor`` where the backend can (NCCL: on the GPU; gloo: on the CPU,
    in fp32 for bf16), writing the result back in place."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    dtype = torch.float32 if tensor.dtype == torch.bfloat16 and device.type == "cpu" else tensor.dtype
    if tensor.device == device and tensor.dtype == dtype and tensor.is_contiguous():
        collective(tensor)
        return
    buffer = tensor.to(device, dtype).contiguous()
    collective(buffer)
    tensor.copy_(buffer)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returned for chaining."""
    if world_size() > 1:
        _in_place(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return tensor


def reduce_gradients(parameters: Iterable[torch.Tensor], divisor: float) -> None:
    """Replace each gradient by its sum over all ranks divided by ``divisor`` (a missing gradient
    counts as zeros); in one process only the division happens."""
    size = world_size()
    for parameter in parameters:
        if size == 1:
            if parameter.grad is not None:
                parameter.grad.div_(divisor)
            continue
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        all_reduce_sum(parameter.grad).div_(divisor)


def broadcast_from_first(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite each tensor with rank 0's, in place (bit-identical results on every rank)."""
    if world_size() == 1:
        return
    for tensor in tensors:
        _in_place(tensor.data, lambda t: dist.broadcast(t, src=0))


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def agreed_digest(local: str) -> str:
    """One digest of every rank's local digest (in rank order), the same on every rank."""
    if world_size() == 1:
        return local
    digests: list[str | None] = [None] * world_size()
    dist.all_gather_object(digests, local)
    return hashlib.sha1("|".join(digests).encode()).hexdigest()


class RankSharedParameters:
    """Train parameters whose memory every rank shares without stepping them once per rank.

    Under torchrun on one machine llmcompressor keeps the model's weights in CPU memory shared by
    all ranks (compressed-tensors' distributed offload): an optimiser step in place on such a
    tensor lands once per rank (N steps instead of one). The optimiser gets a private copy of each
    shared parameter instead; :meth:`before_step` hands it the (already reduced) gradient and
    :meth:`after_step` lets rank 0 alone write the stepped value, which is the same on every rank.
    Nothing changes in one process.
    """

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.pairs = []
        self.trainable = []
        for parameter in parameters:
            if world_size() > 1 and parameter.is_shared():
                private = torch.nn.Parameter(parameter.detach().clone())
                self.pairs.append((parameter, private))
                self.trainable.append(private)
            else:
                self.trainable.append(parameter)

    def before_step(self) -> None:
        for shared, private in self.pairs:
            private.grad, shared.grad = shared.grad, None

    def after_step(self) -> None:
        if not self.pairs:
            return
        barrier()  # every rank has finished the forward that read the old values
        if rank() == 0:
            with torch.no_grad():
                for shared, private in self.pairs:
                    shared.copy_(private)
        barrier()  # the new values are there before anyone reads them
