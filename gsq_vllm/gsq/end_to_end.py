"""End-to-end tuning of a quantized model's continuous parameters, codes frozen.

After GSQ has chosen every code layer by layer, the per-group scales (and, optionally, the norm
weights) are tuned together so that the whole model's next-token distribution matches the
full-precision model's: ``KL(teacher || student)`` on calibration sequences. Layer-wise
objectives cannot see how errors compound through the depth of the model; this stage can, and
it changes nothing in the checkpoint's format (same codes, other scales).

Plain torch: the caller provides the student's and the teacher's log-probabilities for a list of
calibration items, and the parameters to train. Like the layer-wise stages it never returns
something worse than its start: the result is kept only if it lowers the KL on held-out items.
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


@dataclass
class EndToEndConfig:
    steps: int = 40
    lr: float = 2e-3  # Adam, cosine decay to 0
    items_per_step: int = 4
    holdout: float = 0.1  # fraction of the items kept out of training for the final check
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0 or self.items_per_step < 1 or self.lr <= 0:
            raise ValueError(f"invalid end-to-end settings: {self}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be a fraction in [0, 1), got {self.holdout}")


@dataclass
class EndToEndResult:
    initial_kl: float
    final_kl: float
    kept_initial: bool
    history: list[float] = field(default_factory=list)


def kl_divergence(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(p || q)`` for log-probabilities ``[..., vocab]``."""
    teacher = teacher_log_probs.reshape(-1, teacher_log_probs.shape[-1]).float()
    student = student_log_probs.reshape(-1, student_log_probs.shape[-1]).float()
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def _accumulate_kl_gradients(
    student: Callable[[list[int]], torch.Tensor],
    teacher: Callable[[list[int]], torch.Tensor],
    items: list[int],
    parameters: list[torch.nn.Parameter],
) -> float:
    """Gradient of the mean KL over every position of ``items``, one item's graph at a time.

    The same gradient as one backward through all items together (up to rounding order), but only
    one item's activations and logits are alive at once: memory does not grow with the items per step.
    Under torchrun the mean runs over every rank's items (each rank passes its own).
    """
    total, positions = 0.0, 0
    for item in items:
        with torch.no_grad():
            target = teacher([item]).float()
        log_probs = student([item])
        count = log_probs.numel() // log_probs.shape[-1]
        kl_sum = kl_divergence(target, log_probs) * count
        kl_sum.backward()
        total, positions = total + kl_sum.item(), positions + count
        del target, log_probs, kl_sum
    total, positions = distributed.all_reduce_sum(torch.tensor([total, positions], dtype=torch.float64)).tolist()
    distributed.reduce_gradients(parameters, positions)
    return total / positions


def tune_end_to_end(
    student: Callable[[list[int]], torch.Tensor],
    teacher: Callable[[list[int]], torch.Tensor],
    parameters: list[torch.nn.Parameter],
    count: int,
    config: EndToEndConfig = EndToEndConfig(),
    *,
    progress: bool = True,
) -> EndToEndResult:
    """Adam on ``parameters`` to lower ``KL(teacher(items) || student(items))``.

    ``student(items)`` / ``teacher(items)`` return log-probabilities ``[..., vocab]`` for a list of
    item indices in ``range(count)``; the student's must depend differentiably on ``parameters``.
    The last ``config.holdout`` of the items are never trained on; if the trained parameters do
    not lower the KL there, they are restored to their start.
    """
    if count < 1:
        raise ValueError("end-to-end tuning needs at least one calibration item")
    held_count = min(count - 1, round(count * config.holdout)) if count > 1 else 0
    train_count = count - held_count
    held = list(range(train_count, count)) if held_count else list(range(count))
    start = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def held_out_kl() -> float:  # the mean over every rank's held-out items
        total = torch.tensor([float(sum(kl_divergence(teacher([i]), student([i])) for i in held)), len(held)],
                             dtype=torch.float64)
        total = distributed.all_reduce_sum(total)
        return float(total[0] / total[1])

    initial = held_out_kl()
    if config.steps == 0:
        return EndToEndResult(initial, initial, kept_initial=True)
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    batch = min(max(1, config.items_per_step // distributed.world_size()), train_count)  # a rank's share
    history = []
    for step in tqdm(range(config.steps), desc="GSQ end to end", disable=not progress, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        items = torch.randperm(train_count, generator=generator)[:batch].tolist()
        optimizer.zero_grad(set_to_none=True)
        loss = _accumulate_kl_gradients(student, teacher, items, parameters)
        if not math.isfinite(loss):
            raise FloatingPointError(f"end-to-end tuning: the KL is {loss} at step {step}")
        optimizer.step()
        history.append(loss)
    distributed.broadcast_from_first(parameters)  # identical already; bit-identical for sure
    final = held_out_kl()
    if not final < initial:
        logger.info("end-to-end tuning: held-out KL %.5g did not beat its start %.5g; keeping the start", final, initial)
        with torch.no_grad():
            for parameter, value in zip(parameters, start):
                parameter.copy_(value)
        return EndToEndResult(initial, initial, kept_initial=True, history=history)
    return EndToEndResult(initial, final, kept_initial=False, history=history)
