"""One Linear layer on the CPU: each of the plugin's CPU kernels against dense bf16, where bytes dominate.

Run it with the serving environment's Python (single layers, no engine)::

    .venv-serve/bin/python benchmarks/cpu_linear.py                     # 4096^2 and 8192^2, M = 1, 8
    .venv-serve/bin/python benchmarks/cpu_linear.py --sizes 4096 --rows 1 8 64 256

Each kernel is the plugin's own class (``can_implement`` / ``process_weights_after_loading`` /
``apply_weights``) on random codes and scales, group 64, bf16 activations:

* ``dense (vLLM CPU GEMM)``: the ``dequant`` kernel, whose weight goes through vLLM's own
  unquantized-GEMM dispatch (prepacked oneDNN / SGL): exactly what a bf16 model's layers get;
* ``torch-int4``: PyTorch's int4 GEMM on the int4 container (the plugin's CPU default; from its
  large-batch threshold on, a dequantised dense GEMM from the same pack);
* ``cpu-lowbit``: GSQ's C++ kernels reading the 2/3-bit planes directly (2 or 3 bits a weight);
* ``cpu-wna16``: vLLM's CPU W4A16 op on the int4 container (what stock GPTQ W4A16 runs; AVX-512
  builds only).

On the int4 container a 2/3-bit layer moves as many bytes as a 4-bit one; the ``bytes`` column
says what each kernel keeps resident. Every timing is the best of ``--repeats`` calls
after a warm-up, with the spread (slowest - fastest) / fastest; the kernels of one width and row
count take turns call by call, so a slow spell of a shared machine falls on all of them alike. Results:
``benchmarks/results/cpu_linear.json`` with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Callable

import torch

from gsq_vllm.files import write_json_atomic
from gsq_vllm.machine import cpu_description

RESULTS = Path(__file__).resolve().parent / "results"
GROUP = 64
KERNELS = ("dequant", "cpu-lowbit", "torch-int4", "cpu-wna16")
LABELS = {"dequant": "dense (vLLM CPU GEMM)", "cpu-lowbit": "cpu-lowbit (2/3-bit planes)", "torch-int4": "torch-int4", "cpu-wna16": "cpu-wna16 (stock W4A16 op)"}


def layer_config(k: int, n: int, bits: int):
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig

    from gsq_vllm.serving.scheme import GSQ_SCALAR_TYPES

    return MPLinearLayerConfig((k, n), (k, n), GSQ_SCALAR_TYPES[bits], torch.bfloat16, GROUP, False)


def prepared_layer(name: str, k: int, n: int, bits: int):
    """(kernel, layer) ready to run, or (None, reason) where the kernel cannot run here."""
    from gsq_vllm.serving.linear_kernels import KERNELS_BY_NAME

    kernel_cls = KERNELS_BY_NAME[name]
    config = layer_config(k, n, bits)
    ok, reason = kernel_cls.can_implement(config)
    if not ok:
        return None, reason
    generator = torch.Generator().manual_seed(0)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    layer = torch.nn.Module()
    layer.bias = None
    layer.gsq_codes = torch.randint(low, high + 1, (n, k), dtype=torch.int8, generator=generator)
    layer.gsq_scales = ((torch.rand(n, k // GROUP, generator=generator) - 0.5) / 50).to(torch.bfloat16)
    kernel = kernel_cls(config, layer_name=f"{n}x{k}")
    kernel.process_weights_after_loading(layer)
    return kernel, layer


def resident_bytes(name: str, layer: torch.nn.Module, size: int) -> int:
    """Bytes the layer keeps; vLLM's dense dispatch moves its weight into a prepacked handle that is
    no parameter, so the dense layer is counted at its bf16 size."""
    if name == "dequant":
        return size * size * 2
    tensors = list(layer.parameters()) + list(layer.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def time_side_by_side(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Each call's times (seconds), the calls taking turns (in a rotating order) so that a slow
    spell of a shared machine falls on all of them alike instead of on one kernel's whole run."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def best_and_spread(times: list[float]) -> tuple[float, float]:
    best = min(times)
    return best, (max(times) - best) / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192], help="square layers N = K")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_linear.json")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.platforms import current_platform

    from gsq_vllm.serving.server import free_port

    records = []
    with set_current_vllm_config(VllmConfig()), torch.no_grad():
        # one rank on loopback: vLLM's int4 parameters ask for their tensor-parallel rank
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        ensure_model_parallel_initialized(1, 1)
        current_platform.import_kernels()
        for size in args.sizes:
            dense_kernel, dense_layer = prepared_layer("dequant", size, size, args.bits[0])
            dense_times: dict[int, list[float]] = {rows: [] for rows in args.rows}
            for bits in args.bits:
                layers = {}
                for name in KERNELS[1:]:
                    kernel, layer = prepared_layer(name, size, size, bits)
                    if kernel is None:
                        print(f"{size}^2 {bits}-bit {name}: cannot run here ({layer})", flush=True)
                        records.append({"size": size, "bits": bits, "kernel": LABELS[name], "unavailable": layer})
                    else:
                        layers[name] = (kernel, layer)
                if dense_kernel is not None:
                    layers["dequant"] = (dense_kernel, dense_layer)
                for rows in args.rows:
                    x = torch.randn(rows, size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
                    calls = {name: functools.partial(kernel.apply_weights, layer, x) for name, (kernel, layer) in layers.items()}
                    for name, times in time_side_by_side(calls, args.repeats).items():
                        if name == "dequant":  # dense is dense: one record per size, from every width's turns
                            dense_times[rows] += times
                            continue
                        best, spread = best_and_spread(times)
                        record = {"size": size, "bits": bits, "kernel": LABELS[name], "rows": rows,
                                  "ms": round(best * 1e3, 3), "spread": round(spread, 3),
                                  "bytes": resident_bytes(name, layers[name][1], size)}
                        print(json.dumps(record), flush=True)
                        records.append(record)
                layers.pop("dequant", None)
                del layers
            if dense_kernel is None:
                records.append({"size": size, "bits": None, "kernel": LABELS["dequant"], "unavailable": dense_layer})
            for rows, times in dense_times.items():
                if times:
                    best, spread = best_and_spread(times)
                    record = {"size": size, "bits": None, "kernel": LABELS["dequant"], "rows": rows,
                              "ms": round(best * 1e3, 3), "spread": round(spread, 3),
                              "bytes": resident_bytes("dequant", dense_layer, size)}
                    print(json.dumps(record), flush=True)
                    records.append(record)
            del dense_kernel, dense_layer
    _add_ratios(records)
    payload = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "group_size": GROUP,
               "activations": "bfloat16", "timing": (f"best of {args.repeats} calls per kernel, the kernels of one width and row count "
                         "taking turns (dense: over every width's turns); spread (slowest - fastest) / fastest"),
               "note": args.note, "results": records}
    write_json_atomic(args.out, payload)
    print(f"written {args.out}")
    return 0


def _add_ratios(records: list[dict]) -> None:
    """``x_dense``: dense time / this time (above 1: faster than the bf16 model's layer);
    ``x_int4``: torch-int4's time at the same width / this time (the int4 container)."""
    dense = {(r["size"], r["rows"]): r["ms"] for r in records if r["kernel"] == LABELS["dequant"] and "ms" in r}
    int4 = {(r["size"], r["rows"], r["bits"]): r["ms"] for r in records if r["kernel"] == LABELS["torch-int4"] and "ms" in r}
    for r in records:
        if "ms" in r and (r["size"], r["rows"]) in dense:
            r["x_dense"] = round(dense[(r["size"], r["rows"])] / r["ms"], 2)
        if "ms" in r and (r["size"], r["rows"], r["bits"]) in int4:
            r["x_int4"] = round(int4[(r["size"], r["rows"], r["bits"])] / r["ms"], 2)


if __name__ == "__main__":
    raise SystemExit(main())
