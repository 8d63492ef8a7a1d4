"""Accuracy of a (quantized) causal LM on held-out text: cross-entropy, perplexity, EAR and KL.

* cross-entropy: mean next-token negative log-likelihood over every predicted position of every
  window (the same average transformers' ``labels=`` loss takes when all windows have one length);
  perplexity is its exponential.
* EAR (expected acceptance rate): mean over positions of ``sum_v min(p(v), q(v))`` between the
  reference's next-token distribution ``p`` and the candidate's ``q``; 1.0 for identical models.
* KL: mean over positions of ``KL(p || q)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm


_ROWS_PER_CHUNK = 256  # positions per fp64 softmax chunk (bounds memory at ~100 MB per tensor)


@dataclass
class EvalResult:
    ce: float
    ppl: float
    tokens: int
    windows: int
    window_length: int
    ear: float | None = None
    kl: float | None = None
    reference_ce: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(model: torch.nn.Module, input_ids: torch.Tensor, what: str, window: int) -> torch.Tensor:
    """A batch's logits; NaN or Inf in them is an error, never a ``nan`` in a table."""
    device = next(model.parameters()).device
    logits = model(input_ids.to(device), use_cache=False).logits.float().cpu()
    if not torch.isfinite(logits).all():
        raise ValueError(f"{what}: the logits on window {window} hold NaN or Inf (its weights or scales are not "
                         "finite, or overflow in this dtype); no score is reported")
    return logits


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    windows: torch.Tensor,
    reference: torch.nn.Module | None = None,
    *,
    batch_size: int = 1,
    progress: bool = True,
    description: str = "eval",
) -> EvalResult:
    """Evaluate ``model`` on token windows ``[count, length]``; EAR and KL against ``reference``."""
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError(f"windows must be [count >= 1, length >= 2], got shape {tuple(windows.shape)}")
    nll_sum = ref_nll_sum = ear_sum = kl_sum = 0.0
    positions = 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=description, disable=not progress, unit="batch"):
        batch = windows[start : start + batch_size]
        targets = batch[:, 1:].reshape(-1)
        logits_q = _logits(model, batch, description, start)[:, :-1].reshape(targets.numel(), -1)
        logits_p = (None if reference is None
                    else _logits(reference, batch, f"{description} (reference)", start)[:, :-1].reshape(targets.numel(), -1))
        positions += targets.numel()
        # fp64 in chunks of rows: an fp32 softmax over a 49k vocabulary normalises only to ~2e-5,
        # enough to show EAR = 1.00002 for a model against itself
        for begin in range(0, targets.numel(), _ROWS_PER_CHUNK):
            rows = slice(begin, begin + _ROWS_PER_CHUNK)
            log_q = torch.log_softmax(logits_q[rows].double(), dim=-1)
            nll_sum += float(-log_q.gather(1, targets[rows, None]).sum())
            if logits_p is not None:
                log_p = torch.log_softmax(logits_p[rows].double(), dim=-1)
                ref_nll_sum += float(-log_p.gather(1, targets[rows, None]).sum())
                p = log_p.exp()
                ear_sum += float(torch.minimum(p, log_q.exp()).sum())
                kl_sum += float((p * (log_p - log_q)).sum())
        del logits_q, logits_p
    ce = nll_sum / positions
    result = EvalResult(
        ce=ce, ppl=math.exp(ce), tokens=positions, windows=windows.shape[0], window_length=windows.shape[1]
    )
    if reference is not None:
        result.ear = ear_sum / positions
        result.kl = kl_sum / positions
        result.reference_ce = ref_nll_sum / positions
    return result


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A small fixed-width text table (floats with 4 significant decimals)."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
        return str(value)

    table = [[cell(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in table)) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in table]
    return "\n".join(lines)


def evaluate_models(
    model_dir: str | Path,
    reference_dir: str | Path | None,
    text: str,
    windows: int,
    seq_len: int,
    from_end: bool = True,
) -> dict:
    """Load a model folder or checkpoint (and a reference), evaluate it on a text: ``gsq-vllm eval``'s job."""
    from gsq_vllm import data
    from gsq_vllm.checkpoint import inspect_checkpoint, load_causal_lm, load_tokenizer, read_config

    for folder in (model_dir, reference_dir):  # every bad file is refused before anything heavy loads
        if folder:
            inspect_checkpoint(folder)
            context = read_config(folder).get("max_position_embeddings")
            if isinstance(context, int) and seq_len > context:
                raise ValueError(f"windows of {seq_len} tokens are longer than the model's context: "
                                 f"max_position_embeddings is {context} in {Path(folder) / 'config.json'}; "
                                 f"use --seq-len {context} or less")
    tokenizer = load_tokenizer(reference_dir or model_dir)
    model = load_causal_lm(model_dir)
    reference = load_causal_lm(reference_dir) if reference_dir else None
    batch = data.text_windows(text, tokenizer, windows, seq_len, from_end=from_end)
    torch.manual_seed(0)
    result = evaluate(model, batch, reference, description=f"eval {Path(model_dir).name}")
    return {"model": str(model_dir), "reference": str(reference_dir) if reference_dir else None,
            "text": str(data.resolve_text(text)), **result.to_dict()}
