"""The llama.cpp side of benchmarks/serve_shapes.py, run in .venv-llamacpp (llama-cpp-python and
gguf only, not this package): time one GGUF as the vLLM child times a checkpoint, and read its sizes.

    .venv-llamacpp/bin/python benchmarks/llama_cpp_child.py SPEC_JSON      # prints RESULT {...}
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def run_llama_child(spec: dict) -> dict:
    """Decode at batch 1 and prefill with llama.cpp: the best of ``repeats`` runs, as the vLLM child
    (which times a run with and without the decode steps; here the steps are timed alone)."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    if not spec.get("extra_buffers", True):  # llama.cpp's AMX / repacked weight layouts off (not a Llama() option)
        defaults = llama_cpp.llama_model_default_params

        def without_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers  # what Llama() calls
    threads = os.cpu_count()
    start = time.perf_counter()
    llm = Llama(model_path=spec["path"], n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    startup = time.perf_counter() - start

    def prompt_seconds(prompt: list[int]) -> float:
        llm.reset()
        begin = time.perf_counter()
        llm.eval(prompt)
        return time.perf_counter() - begin

    def decode_seconds(prompt: list[int], new_tokens: int) -> float:
        """Greedy steps after the prompt, one token each (the prompt itself not timed)."""
        prompt_seconds(prompt)
        begin = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return time.perf_counter() - begin

    weight_bytes, read_bytes = gguf_read_bytes(Path(spec["path"]))
    repeats, new_tokens = spec["repeats"], spec["new_tokens"]
    decode_seconds(spec["short"], 8)  # warm-up
    full = [decode_seconds(spec["short"], new_tokens) for _ in range(repeats)]
    prefill = [sum(prompt_seconds(prompt) for prompt in spec["long"]) for _ in range(repeats)]
    return {
        "decode_tok_s_bs1": round((new_tokens - 1) / min(full), 2),
        "prefill_tok_s": round(sum(map(len, spec["long"])) / min(prefill), 1),
        "spread": {"decode_bs1": round((max(full) - min(full)) / min(full), 3),
                   "prefill": round((max(prefill) - min(prefill)) / min(prefill), 3)},
        "startup_s": round(startup, 1),
        "threads": threads,
        "weight_bytes": weight_bytes,
        "read_bytes": read_bytes,
    }


def gguf_read_bytes(path: Path) -> tuple[int, int]:
    """(bytes of every tensor, bytes a decode step reads: all but an input embedding that has its own
    output matrix beside it), from the GGUF's tensor table."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    untied = "output.weight" in tensors
    return total, total - (tensors.get("token_embd.weight", 0) if untied else 0)


def main(argv: list[str]) -> int:
    print("RESULT " + json.dumps(run_llama_child(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
