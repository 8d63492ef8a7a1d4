"""Small things for tests and examples: a tiny random Llama that saves like a real one."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def tiny_llama_config(
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
):
    """A LlamaConfig a few layers deep, hidden size a multiple of 128 (group sizes 32..128 divide it)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_tiny_llama(seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A randomly initialised LlamaForCausalLM (fp32, eval mode), reproducible for a seed."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides))
    # Random init gives near-uniform outputs; widen the weights so quantization error shows up.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "embed" not in name:
                param.mul_(3.0)
    return model.eval()


def save_tiny_llama(directory: str | os.PathLike, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny Llama with a working byte-level tokenizer; returns the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    model = build_tiny_llama(seed, **config_overrides)
    model.save_pretrained(directory, safe_serialization=True)
    vocab_size = model.config.vocab_size
    # A byte-level BPE without merges: ids 0..255 are bytes, enough for real text round-trips.
    byte_vocab = {token: index for index, token in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = {"<unk>": len(byte_vocab), "<s>": len(byte_vocab) + 1, "</s>": len(byte_vocab) + 2, **byte_vocab}
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    assert len(vocab) <= vocab_size, "vocab_size too small for the byte tokenizer"
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )
    tokenizer.save_pretrained(directory)
    return directory
