"""GSQ's optimisation loop: Lion on logits and scales, annealed temperature, two objectives.

* :func:`optimize_layer`: one Linear, objective ``||(W - W_soft) L||_F^2 / ||W L||_F^2`` with
  ``H = L L^T`` the damped calibration Hessian (cost independent of the token count).
* :func:`optimize_block`: several Linears trained jointly on a block's output (a whole decoder
  layer, or an MLP) over cached calibration items (one item = one captured call of the block,
  usually one sequence), relative MSE against given targets: what the full-precision model
  computes there (error-correcting) or what the original weights compute from the same inputs.

Both start from given codes and scales (GPTQ's, by default), return the final codes and scales,
and never return something worse than the start: the trained codes are kept only if they beat
the start on calibration items held out of training (the layer objective, having no tokens,
compares on the objective itself).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from gsq_vllm.gsq import distributed
from gsq_vllm.gsq.grids import Grid, dequantize
from gsq_vllm.gsq.fusion import MaybeCompiled
from gsq_vllm.gsq.gptq import damped_hessian
from gsq_vllm.gsq.relaxation import RelaxedWeight

logger = logging.getLogger(__name__)


@dataclass
class GSQConfig:
    """Optimisation settings. Defaults are sized for a CPU budget (100 steps); the paper used
    hundreds to thousands of steps with tau 2 -> 0.05, kappa 100 -> 500."""

    steps: int = 100
    lr_logits: float = 1e-3
    lr_scales: float = 2e-3  # on the log of the scales: a relative step
    weight_decay: float = 1.0  # decoupled, logits only
    betas: tuple[float, float] = (0.9, 0.95)
    min_lr_ratio: float = 0.1  # cosine decay to this fraction
    tau: tuple[float, float] = (2.0, 0.2)  # linear anneal, start -> end
    kappa: tuple[float, float] = (100.0, 500.0)  # logit multiplier, start -> end
    logit_std: float = 0.01
    prior_strength: float = 12.0  # 6 (the authors') re-samples ~9% of codes each step: too far from a short run's start
    tokens_per_step: int = 2048  # block objective: calibration tokens per step (whole items)
    holdout: float = 0.1  # block objective: fraction of the items kept out of training for the final check
    logits_dtype: str = "float32"  # or "bfloat16" to halve the logits' memory
    seed: int = 0
    dampening: float = 0.01  # layer objective: fraction of mean(diag H) added to the diagonal
    fused: bool = True  # torch.compile the relaxation and the Lion update (eager if no compiler)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.logits_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"logits_dtype must be float32 or bfloat16, got {self.logits_dtype!r}")
        if min(self.tau) <= 0:
            raise ValueError(f"temperatures must be positive, got {self.tau}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout must be a fraction in [0, 1), got {self.holdout}")


@dataclass
class GSQResult:
    codes: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    initial_loss: float
    final_loss: float
    kept_initial: bool = False
    history: list[float] = field(default_factory=list)


def _lion_update(param, grad, momentum, lr, weight_decay, beta1, beta2):
    """One Lion step for one tensor, in place (a single fused loop when compiled)."""
    grad = grad.to(torch.float32)
    update = torch.sign(beta1 * momentum + (1 - beta1) * grad)
    param.copy_((param.to(torch.float32) * (1 - lr * weight_decay) - lr * update).to(param.dtype))
    momentum.copy_(beta2 * momentum + (1 - beta2) * grad)


_fused_lion_update = MaybeCompiled(_lion_update)


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum, decoupled weight decay.

    ``fused=True`` runs each tensor's update as one compiled loop: on a CPU the eager update is
    eight passes over the logits, as slow as the relaxation itself.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, fused: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))
        self.fused = fused

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(param, dtype=torch.float32)
                scalars = [torch.tensor(float(v)) for v in (group["lr"], group["weight_decay"], beta1, beta2)]
                _fused_lion_update(param, param.grad, state["momentum"], *scalars, fused=self.fused)


def _schedule(start: float, end: float, step: int, steps: int) -> float:
    return start + (end - start) * (step / max(steps - 1, 1))


def _cosine(step: int, steps: int, min_ratio: float) -> float:
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name}: weight has NaN or Inf values; GSQ cannot quantize it")


def _make_relaxed(
    weights: dict[str, torch.Tensor], codes: dict[str, torch.Tensor], scales: dict[str, torch.Tensor],
    grid: Grid | Mapping[str, Grid], config: GSQConfig, generator: torch.Generator,
) -> dict[str, RelaxedWeight]:
    relaxed = {}
    for name in weights:
        _check_finite(name, weights[name])
        relaxed[name] = RelaxedWeight(
            grid[name] if isinstance(grid, Mapping) else grid, codes[name], scales[name], logit_std=config.logit_std, prior_strength=config.prior_strength,
            logits_dtype=getattr(torch, config.logits_dtype), generator=generator, fused=config.fused,
        )
    return relaxed


def _train(
    relaxed: dict[str, RelaxedWeight],
    loss_fn: Callable[[dict[str, torch.Tensor], int], torch.Tensor],
    config: GSQConfig,
    description: str,
    progress: bool,
    data_parallel: bool = False,
) -> list[float]:
    """The shared loop: sample soft weights, take a Lion step, anneal tau/kappa, decay lr.

    ``data_parallel``: each rank's loss is on its own calibration shard, so gradients are averaged
    over ranks before the step (the noise is seeded by step: every rank samples the same weights).
    """
    optimizer = Lion(
        [
            {"params": [r.logits for r in relaxed.values()], "lr": config.lr_logits, "weight_decay": config.weight_decay},
            {"params": [r.log_gain for r in relaxed.values()], "lr": config.lr_scales, "weight_decay": 0.0},
        ],
        betas=config.betas,
        fused=config.fused,
    )
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    history = []
    for step in tqdm(range(config.steps), desc=description, disable=not progress, leave=False):
        tau = _schedule(*config.tau, step, config.steps)
        kappa = _schedule(*config.kappa, step, config.steps)
        factor = _cosine(step, config.steps, config.min_lr_ratio)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        noise_seed = config.seed * 1_000_003 + step
        soft = {
            name: r.soft_weight(kappa, tau, noise_seed + 7919 * index) for index, (name, r) in enumerate(relaxed.items())
        }
        loss = loss_fn(soft, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{description}: the relaxed objective is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if data_parallel:  # the mean of the ranks' gradients
            distributed.reduce_gradients([p for group in optimizer.param_groups for p in group["params"]],
                                         distributed.world_size())
        optimizer.step()
        history.append(loss.item())
    return history


def _finish(
    relaxed: dict[str, RelaxedWeight],
    init_codes: dict[str, torch.Tensor],
    init_scales: dict[str, torch.Tensor],
    hard_loss: Callable[[dict[str, torch.Tensor]], float],
    history: list[float],
    label: str,
) -> GSQResult:
    codes = {name: r.hard_codes() for name, r in relaxed.items()}
    scales = {name: r.scales.detach().clone() for name, r in relaxed.items()}
    distributed.broadcast_from_first([*codes.values(), *scales.values()])  # every rank writes the same
    initial = hard_loss({n: dequantize(init_codes[n], init_scales[n]) for n in relaxed})
    final = hard_loss({n: dequantize(codes[n], scales[n]) for n in relaxed})
    if not final < initial:  # also catches NaN
        logger.info("%s: GSQ result %.5g did not beat its start %.5g; keeping the initial codes", label, final, initial)
        return GSQResult(
            {n: c.clone() for n, c in init_codes.items()}, {n: s.clone().float() for n, s in init_scales.items()},
            initial, initial, kept_initial=True, history=history,
        )
    return GSQResult(codes, scales, initial, final, history=history)


def hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Lower Cholesky factor L of the damped Hessian (H + d * mean(diag H) * I = L L^T)."""
    factor, info = torch.linalg.cholesky_ex(damped_hessian(hessian, dampening))
    if info.item() != 0:
        raise ValueError("the calibration Hessian is not positive definite even after dampening; raise dampening")
    return factor


@torch.no_grad()
def layer_objective(weight: torch.Tensor, quantized: torch.Tensor, factor: torch.Tensor) -> float:
    reference = (weight.to(torch.float32) @ factor).square().sum()
    return float(((weight.to(torch.float32) - quantized) @ factor).square().sum() / reference)


def optimize_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    grid: Grid,
    config: GSQConfig = GSQConfig(),
    *,
    name: str = "layer",
    progress: bool = True,
) -> GSQResult:
    """GSQ on one Linear ``weight [out, in]`` with its calibration Hessian ``[in, in]``."""
    generator = torch.Generator(device=weight.device).manual_seed(config.seed)
    distributed.broadcast_from_first([codes, scales])
    relaxed = _make_relaxed({name: weight}, {name: codes}, {name: scales}, grid, config, generator)
    factor = hessian_factor(hessian, config.dampening)
    target = weight.detach().to(torch.float32)
    norm = (target @ factor).square().sum()

    def loss_fn(soft, _step):
        return ((target - soft[name]) @ factor).square().sum() / norm

    history = _train(relaxed, loss_fn, config, f"GSQ {name}", progress)
    return _finish(
        relaxed, {name: codes}, {name: scales},
        lambda q: layer_objective(target, q[name], factor), history, name,
    )


def optimize_block(
    forward: Callable[[dict[str, torch.Tensor], int], torch.Tensor],
    weights: dict[str, torch.Tensor],
    targets: Sequence[torch.Tensor],
    codes: dict[str, torch.Tensor],
    scales: dict[str, torch.Tensor],
    grid: Grid | Mapping[str, Grid],
    config: GSQConfig = GSQConfig(),
    *,
    name: str = "block",
    progress: bool = True,
) -> GSQResult:
    """GSQ on several Linears at once: ``forward(weights, i)`` must approach ``targets[i]``.

    ``forward(weights, i)`` runs the block on its ``i``-th cached calibration item with the given
    Linear weights; ``targets[i]`` is what it should output there. Each step takes enough random
    training items for ``config.tokens_per_step`` tokens; the last ``config.holdout`` of the items
    are never trained on and decide whether the result beats the start. ``grid`` is one grid for
    every Linear, or one per name (a block mixing widths: 4-bit attention, 2-bit MLP).
    """
    count = len(targets)
    if count < 1:
        raise ValueError(f"{name}: no calibration items")
    held_count = min(count - 1, round(count * config.holdout)) if count > 1 else 0
    train_count = count - held_count
    held = range(train_count, count) if held_count else range(count)
    tokens_per_item = max(1, targets[0].numel() // targets[0].shape[-1])
    # under torchrun each rank takes its share of a step's tokens from its own calibration shard
    batch = max(1, min(train_count, config.tokens_per_step // tokens_per_item // distributed.world_size()))
    generator = torch.Generator().manual_seed(config.seed)
    distributed.broadcast_from_first([*codes.values(), *scales.values()])
    relaxed = _make_relaxed(weights, codes, scales, grid, config, generator)
    energy = distributed.all_reduce_sum(torch.tensor(
        [sum(float(t.float().square().sum()) for t in targets), float(sum(t.numel() for t in targets))],
        dtype=torch.float64))
    power = max(float(energy[0] / energy[1]), 1e-12)

    def error(outputs: torch.Tensor, index: int) -> torch.Tensor:
        return (outputs.float() - targets[index].to(outputs.device, torch.float32)).square().sum()

    def loss_fn(soft, _step):
        chosen = torch.randperm(train_count, generator=generator)[:batch].tolist()
        total = sum(error(forward(soft, i), i) for i in chosen)
        return total / (power * sum(targets[i].numel() for i in chosen))

    history = _train(relaxed, loss_fn, config, f"GSQ {name}", progress, data_parallel=distributed.world_size() > 1)

    @torch.no_grad()
    def hard_loss(quantized):
        total = torch.tensor([float(sum(error(forward(quantized, i), i) for i in held)),
                              float(sum(targets[i].numel() for i in held))], dtype=torch.float64)
        distributed.all_reduce_sum(total)  # every rank's held-out items decide together
        return float(total[0] / (power * total[1]))

    return _finish(relaxed, codes, scales, hard_loss, history, name)
