"""End-to-end tuning of a quantized model's continuous parameters, codes frozen.

After GSQ has chosen every code layer by layer, the per-group scales (and, optionally, the norm
weights) are tuned together so that the whole model's next-token distribution matches the
full-precision model's: ``KL(teacher || student)`` on calibration sequences. Layer-wise
objectives cannot see how errors compound through the depth of the model; this stage can, and
it changes nothing in the checkpoint's format (same codes, other scales).

Plain torch: the caller provides the student's and the teacher's final hidden states for a list
of calibration items, the output head(s) that turn them into logits, and the parameters to train.
The KL is computed a slice of positions at a time (``positions_per_chunk``), so the full-vocabulary
logits of a whole sequence never exist at once: memory grows with chunk x vocabulary, not with
sequence length x vocabulary (at Llama-3's 128k vocabulary, one 2048-token sequence's fp32 logits
are 1 GB per copy, and a KL's forward and backward holds several copies). Like the layer-wise
stages it never returns something worse than its start: the result is kept only if it lowers the
KL on held-out items.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from gsq_vllm.gsq import distributed

logger = logging.getLogger(__name__)

__all__ = ["EndToEndConfig", "EndToEndResult", "kl_divergence", "tune_end_to_end"]

Items = Callable[[list[int]], torch.Tensor]  # item indices -> final hidden states [positions, width]
Head = Callable[[torch.Tensor], torch.Tensor]  # hidden states -> logits


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


@dataclass
class EndToEndConfig:
    steps: int = 40
    lr: float = 2e-3  # Adam, cosine decay to 0
    items_per_step: int = 4
    holdout: float = 0.1  # fraction of the items kept out of training for the final check
    seed: int = 0
    positions_per_chunk: int = 128  # positions whose full-vocabulary logits exist at once
    #: check the held-out KL every this many steps and end with the best parameters seen, as
    #: AutoRound keeps its best iteration (0: the end alone is checked against the start)
    keep_best_every: int = 0

    def __post_init__(self):
        if (self.steps < 0 or self.items_per_step < 1 or self.lr <= 0 or self.positions_per_chunk < 1
                or self.keep_best_every < 0):
            raise ValueError(f"invalid end-to-end settings: {self}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be a fraction in [0, 1), got {self.holdout}")


@dataclass
class EndToEndResult:
    initial_kl: float
    final_kl: float
    kept_initial: bool
    history: list[float] = field(default_factory=list)
    best_step: int | None = None  # steps taken by the parameters returned (None: the start)
    held_out: dict[int, float] = field(default_factory=dict)  # steps taken -> held-out KL, every check


def kl_divergence(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(p || q)`` for log-probabilities ``[..., vocab]``."""
    teacher = teacher_log_probs.reshape(-1, teacher_log_probs.shape[-1]).float()
    student = student_log_probs.reshape(-1, student_log_probs.shape[-1]).float()
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def _chunks(positions: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, positions)) for start in range(0, positions, size)]


def _chunk_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, head: Head, teacher_head: Head
              ) -> torch.Tensor:
    """Mean ``KL(teacher || student)`` over one chunk of positions (no gradient on the teacher's side)."""
    with torch.no_grad():
        target = torch.log_softmax(teacher_head(teacher_hidden).float(), dim=-1)
    return kl_divergence(target, torch.log_softmax(head(student_hidden).float(), dim=-1))


def _item_kl_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, head: Head, teacher_head: Head,
                 chunk: int) -> torch.Tensor:
    """``KL(teacher || student)`` summed over the positions of one item, a chunk of positions at a
    time (no gradient: the held-out check)."""
    student_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    total = torch.zeros((), dtype=torch.float64)
    for part in _chunks(student_hidden.shape[0], chunk):
        total += _chunk_kl(student_hidden[part], teacher_hidden[part], head, teacher_head).double() * (
            part.stop - part.start)
    return total


def _accumulate_kl_gradients(
    student: Items,
    teacher: Items,
    items: list[int],
    parameters: list[torch.nn.Parameter],
    head: Head = _identity,
    teacher_head: Head | None = None,
    chunk: int = 128,
) -> float:
    """Gradient of the mean KL over every position of ``items``, one item's graph at a time.

    The same gradient as one backward through all items together (up to rounding order), but only
    one item's activations and one chunk of its logits are alive at once: the head and the KL run
    on a detached copy of the item's hidden states, chunk by chunk, each chunk's backward adding to
    that copy's gradient, which then flows back through the model once. Under torchrun the mean
    runs over every rank's items (each rank passes its own).
    """
    teacher_head = teacher_head or head
    total, positions = 0.0, 0
    for item in items:
        with torch.no_grad():
            target_hidden = teacher([item])
        hidden = student([item])
        hidden = hidden.reshape(-1, hidden.shape[-1])
        target_hidden = target_hidden.reshape(-1, target_hidden.shape[-1])
        detached = hidden.detach().requires_grad_(hidden.requires_grad)
        for part in _chunks(hidden.shape[0], chunk):
            kl_sum = _chunk_kl(detached[part], target_hidden[part], head, teacher_head) * (part.stop - part.start)
            if kl_sum.requires_grad:
                kl_sum.backward()
            total += kl_sum.item()
            del kl_sum
        if detached.grad is not None:
            hidden.backward(detached.grad)
        positions += hidden.shape[0]
        del hidden, detached, target_hidden
    total, positions = distributed.all_reduce_sum(torch.tensor([total, positions], dtype=torch.float64)).tolist()
    distributed.reduce_gradients(parameters, positions)
    return total / positions


def tune_end_to_end(
    student: Items,
    teacher: Items,
    parameters: list[torch.nn.Parameter],
    count: int,
    config: EndToEndConfig = EndToEndConfig(),
    *,
    head: Head = _identity,
    teacher_head: Head | None = None,
    progress: bool = True,
) -> EndToEndResult:
    """Adam on ``parameters`` to lower ``KL(softmax(teacher_head(teacher(items))) || softmax(head(student(items))))``.

    ``student(items)`` / ``teacher(items)`` return final hidden states ``[..., width]`` for a list
    of item indices in ``range(count)``; the student's must depend differentiably on ``parameters``.
    ``head`` (``teacher_head``, default the same) maps hidden states to logits; the identity (the
    default) lets the callables return logits directly.
    The last ``config.holdout`` of the items are never trained on; if the trained parameters do
    not lower the KL there, they are restored to their start (with ``config.keep_best_every``, to
    the best of the start, the end and every checked step).
    """
    if count < 1:
        raise ValueError("end-to-end tuning needs at least one calibration item")
    held_count = min(count - 1, round(count * config.holdout)) if count > 1 else 0
    train_count = count - held_count
    held = list(range(train_count, count)) if held_count else list(range(count))
    start = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def held_out_kl() -> float:  # the mean over every rank's held-out items
        total = torch.zeros(2, dtype=torch.float64)  # KL summed over positions, positions
        for i in held:
            target_hidden = teacher([i])
            total[0] += _item_kl_sum(student([i]), target_hidden, head, teacher_head or head, config.positions_per_chunk)
            total[1] += target_hidden.numel() // target_hidden.shape[-1]
        total = distributed.all_reduce_sum(total)
        return float(total[0] / total[1])

    initial = held_out_kl()
    if config.steps == 0:
        return EndToEndResult(initial, initial, kept_initial=True, held_out={0: initial})
    best_kl, best_step, best = initial, None, start
    checks = {0: initial}
    shared = distributed.RankSharedParameters(parameters)  # the model's own weights under torchrun
    optimizer = torch.optim.Adam(shared.trainable, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    batch = min(max(1, config.items_per_step // distributed.world_size()), train_count)  # a rank's share
    history = []
    for step in tqdm(range(config.steps), desc="GSQ end to end", disable=not progress, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        items = torch.randperm(train_count, generator=generator)[:batch].tolist()
        optimizer.zero_grad(set_to_none=True)
        loss = _accumulate_kl_gradients(student, teacher, items, parameters, head, teacher_head,
                                        config.positions_per_chunk)
        if not math.isfinite(loss):
            raise FloatingPointError(f"end-to-end tuning: the KL is {loss} at step {step}")
        shared.before_step()
        optimizer.step()
        shared.after_step()
        history.append(loss)
        taken = step + 1
        if config.keep_best_every and taken % config.keep_best_every == 0 and taken < config.steps:
            checks[taken] = held_out_kl()
            if checks[taken] < best_kl:
                best_kl, best_step, best = checks[taken], taken, [p.detach().clone() for p in parameters]
    distributed.broadcast_from_first([p for p in parameters if not p.is_shared()])  # identical already; bit-identical for sure
    final = checks[config.steps] = held_out_kl()
    if final < best_kl:
        return EndToEndResult(initial, final, kept_initial=False, history=history, best_step=config.steps,
                              held_out=checks)
    if best_step is None:
        logger.info("end-to-end tuning: held-out KL %.5g did not beat its start %.5g; keeping the start", final, initial)
    else:
        logger.info("end-to-end tuning: held-out KL %.5g at the end, %.5g after step %d; keeping step %d",
                    final, best_kl, best_step, best_step)
    distributed.barrier()  # every rank has read the trained values for its held-out check
    with torch.no_grad():
        for parameter, value in zip(parameters, best):
            parameter.copy_(value)
    return EndToEndResult(initial, best_kl, kept_initial=best_step is None, history=history, best_step=best_step,
                          held_out=checks)
