"""A mixture-of-experts model made offline from the dense default model, for MoE quality and serving.

No MoE model can be downloaded here, and a random one would make perplexity meaningless. So this
builds a Mixtral-architecture model (Llama's attention, norms and embeddings exactly; only the
MLP differs) from a dense Llama:

* every decoder layer's MLP becomes ``experts`` routed experts, each the dense MLP with its
  intermediate channels in its own random order (gate/up rows and down columns permuted together:
  the same function, but other quantization groups in ``down_proj``, so each expert gets its own
  codes and a serving bug that mixes experts up changes the output);
* the router is random (normal, ``router_std``), top-``top_k`` of ``experts`` with Mixtral's
  softmax-then-renormalise weights, so tokens really are split between experts; since every
  expert computes the dense MLP, the weights sum to one and the full-precision model computes the
  dense model's function (equal up to fp32 rounding: a GEMM over fewer rows rounds differently).

Once quantized, each expert is fitted on different tokens and its errors differ, which is what an
MoE quantizer has to handle; the perplexity of the full-precision MoE model is the dense model's.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["build_moe_model"]


def build_moe_model(
    dense_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    experts: int = 4,
    top_k: int = 2,
    router_std: float = 0.02,
    seed: int = 0,
) -> Path:
    """Write the Mixtral-architecture model derived from the Llama model at ``dense_dir``
    (moved into place when complete; an existing complete folder is kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

    output_dir = Path(output_dir)
    if (output_dir / "config.json").is_file():
        return output_dir
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k must be in 1..experts ({experts}), got {top_k}")
    dense = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32)
    source = dense.config
    if source.model_type != "llama" or getattr(source, "mlp_bias", False) or source.hidden_act != "silu":
        raise ValueError(f"{dense_dir}: expected a Llama model with a bias-free SiLU MLP, found "
                         f"model_type={source.model_type} hidden_act={source.hidden_act}")
    config = MixtralConfig(
        vocab_size=source.vocab_size, hidden_size=source.hidden_size, intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers, num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads, head_dim=source.head_dim, hidden_act=source.hidden_act,
        max_position_embeddings=source.max_position_embeddings, rms_norm_eps=source.rms_norm_eps,
        rope_parameters=dict(source.rope_parameters), tie_word_embeddings=source.tie_word_embeddings,
        bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id, pad_token_id=source.pad_token_id,
        num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None, router_jitter_noise=0.0,
        attention_dropout=0.0, dtype="float32",
    )
    moe = MixtralForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    dense_state = dense.state_dict()
    state = {}
    for name, tensor in moe.state_dict().items():
        if ".mlp." not in name:
            if name not in dense_state:
                raise ValueError(f"{dense_dir}: no tensor for {name} in the dense model")
            state[name] = dense_state[name]
            continue
        prefix = name.split(".mlp.")[0] + ".mlp."
        if name.endswith("mlp.gate.weight"):
            state[name] = torch.randn(tensor.shape, generator=generator) * router_std
        elif name.endswith("experts.gate_up_proj"):
            gate, up = dense_state[prefix + "gate_proj.weight"], dense_state[prefix + "up_proj.weight"]
            orders = [torch.randperm(gate.shape[0], generator=generator) for _ in range(experts)]
            state[name] = torch.stack([torch.cat([gate[order], up[order]]) for order in orders])
            down = dense_state[prefix + "down_proj.weight"]
            state[prefix + "experts.down_proj"] = torch.stack([down[:, order] for order in orders])
    missing = set(moe.state_dict()) - set(state)
    if missing:
        raise ValueError(f"no value for {sorted(missing)[:4]} while building the MoE model")
    moe.load_state_dict(state)
    tokenizer = AutoTokenizer.from_pretrained(str(dense_dir))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        moe.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %s: %d experts, top-%d, from %s", output_dir, experts, top_k, dense_dir)
    return output_dir
