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

``--isa-cap avx2`` reruns itself with oneDNN, PyTorch's kernels and GSQ's capped at AVX2 by
environment (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``, ``GSQ_VLLM_CPU_ISA``): an AVX-512
machine's estimate of a CPU without AVX-512 or bf16 instructions (vLLM's own compiled CPU ops are
not capped; a whole engine cannot be, see README), with the fp32 dense layer added, since without
bf16 instructions fp32 may be the faster dense baseline. Results: ``cpu_linear_isa-avx2.json``.

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
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from gsq_vllm.files import write_json_atomic
from gsq_vllm.machine import cpu_description

RESULTS = Path(__file__).resolve().parent / "results"
GROUP = 64
KERNELS = ("dequant", "cpu-lowbit", "torch-int4", "cpu-wna16")
LABELS = {"dequant": "dense (vLLM CPU GEMM)", "cpu-lowbit": "cpu-lowbit (2/3-bit planes)", "torch-int4": "torch-int4",
          "cpu-wna16": "cpu-wna16 (stock W4A16 op)", "dequant-fp32": "dense fp32 (vLLM CPU GEMM)"}
#: ``--isa-cap avx2``: a CPU without AVX-512 or bf16 instructions, as far as environment variables
#: reach in one process: oneDNN (the dense GEMMs), PyTorch's kernels and GSQ's (see main)
ISA_CAPS = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "GSQ_VLLM_CPU_ISA": "avx2"}}


def layer_config(k: int, n: int, bits: int, act: torch.dtype = torch.bfloat16):
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig

    from gsq_vllm.serving.scheme import GSQ_SCALAR_TYPES

    return MPLinearLayerConfig((k, n), (k, n), GSQ_SCALAR_TYPES[bits], act, GROUP, False)


def prepared_layer(name: str, k: int, n: int, bits: int):
    """(kernel, layer) ready to run, or (None, reason) where the kernel cannot run here
    (``dequant-fp32``: the dense kernel with fp32 activations, an fp32 model's layer)."""
    from gsq_vllm.serving.linear_kernels import KERNELS_BY_NAME

    act = torch.float32 if name == "dequant-fp32" else torch.bfloat16
    kernel_cls = KERNELS_BY_NAME[name.removesuffix("-fp32")]
    config = layer_config(k, n, bits, act)
    ok, reason = kernel_cls.can_implement(config)
    if not ok:
        return None, reason
    generator = torch.Generator().manual_seed(0)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    layer = torch.nn.Module()
    layer.bias = None
    layer.gsq_codes = torch.randint(low, high + 1, (n, k), dtype=torch.int8, generator=generator)
    layer.gsq_scales = ((torch.rand(n, k // GROUP, generator=generator) - 0.5) / 50).to(act)
    kernel = kernel_cls(config, layer_name=f"{n}x{k}")
    kernel.process_weights_after_loading(layer)
    return kernel, layer


def resident_bytes(name: str, layer: torch.nn.Module, size: int) -> int:
    """Bytes the layer keeps; vLLM's dense dispatch moves its weight into a prepacked handle that is
    no parameter, so the dense layer is counted at its bf16 size."""
    if name.startswith("dequant"):
        return size * size * (4 if name.endswith("fp32") else 2)
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


def timing_record(size: int, bits: int | None, name: str, rows: int, times: list[float], nbytes: int) -> dict:
    """One result: the best time and the spread (slowest - fastest) / fastest; printed as it comes."""
    best = min(times)
    record = {"size": size, "bits": bits, "kernel": LABELS[name], "rows": rows, "ms": round(best * 1e3, 3),
              "spread": round((max(times) - best) / best, 3), "bytes": nbytes}
    print(json.dumps(record), flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192], help="square layers N = K")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_linear.json")
    parser.add_argument("--note", default="")
    parser.add_argument("--isa-cap", choices=sorted(ISA_CAPS), help="cap the instruction sets by environment "
                        "(adds fp32 dense; results in cpu_linear_isa-<cap>.json)")
    args = parser.parse_args(argv)
    if args.isa_cap and any(os.environ.get(k) != v for k, v in ISA_CAPS[args.isa_cap].items()):
        # the caps must be in place before PyTorch and oneDNN pick their code paths: start again
        env = {**os.environ, **ISA_CAPS[args.isa_cap]}
        os.execve(sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)], env)
    if args.isa_cap and args.out == RESULTS / "cpu_linear.json":
        args.out = RESULTS / f"cpu_linear_isa-{args.isa_cap}.json"
    dense_names = ("dequant", "dequant-fp32") if args.isa_cap else ("dequant",)

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.platforms import current_platform

    from harness.server import free_port

    records = []
    with set_current_vllm_config(VllmConfig()), torch.no_grad():
        # one rank on loopback: vLLM's int4 parameters ask for their tensor-parallel rank
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        ensure_model_parallel_initialized(1, 1)
        current_platform.import_kernels()
        for size in args.sizes:
            dense = {name: prepared_layer(name, size, size, args.bits[0]) for name in dense_names}
            dense_times: dict[tuple[str, int], list[float]] = {}
            for bits in args.bits:
                layers = {}
                for name in KERNELS[1:]:
                    if args.isa_cap and name == "cpu-wna16":  # vLLM's op: AVX-512 builds, AMX above one row
                        records.append({"size": size, "bits": bits, "kernel": LABELS[name],
                                        "unavailable": "needs AVX-512 (vLLM's W4A16 CPU op), not capped"})
                        continue
                    kernel, layer = prepared_layer(name, size, size, bits)
                    if kernel is None:
                        print(f"{size}^2 {bits}-bit {name}: cannot run here ({layer})", flush=True)
                        records.append({"size": size, "bits": bits, "kernel": LABELS[name], "unavailable": layer})
                    else:
                        layers[name] = (kernel, layer)
                layers.update({name: pair for name, pair in dense.items() if pair[0] is not None})
                for rows in args.rows:
                    x = torch.randn(rows, size, generator=torch.Generator().manual_seed(1))
                    calls = {name: functools.partial(kernel.apply_weights, layer,
                                                     x if name.endswith("fp32") else x.to(torch.bfloat16))
                             for name, (kernel, layer) in layers.items()}
                    for name, times in time_side_by_side(calls, args.repeats).items():
                        if name in dense:  # dense is dense: one record per size, from every width's turns
                            dense_times.setdefault((name, rows), []).extend(times)
                            continue
                        records.append(timing_record(size, bits, name, rows, times,
                                                     resident_bytes(name, layers[name][1], size)))
                del layers
            for name, (kernel, reason) in dense.items():
                if kernel is None:
                    records.append({"size": size, "bits": None, "kernel": LABELS[name], "unavailable": reason})
            for (name, rows), times in dense_times.items():
                records.append(timing_record(size, None, name, rows, times, resident_bytes(name, dense[name][1], size)))
            del dense
    _add_ratios(records)
    payload = {"cpu": cpu_description(), "isa_cap": {"cap": args.isa_cap, "env": ISA_CAPS[args.isa_cap]} if args.isa_cap else None,
               "threads": torch.get_num_threads(), "group_size": GROUP,
               "activations": "bfloat16", "timing": (f"best of {args.repeats} calls per kernel, the kernels of one width and row count "
                         "taking turns (dense: over every width's turns); spread (slowest - fastest) / fastest"),
               "note": args.note, "results": records}
    write_json_atomic(args.out, payload)
    print(f"written {args.out}")
    return 0


def _add_ratios(records: list[dict]) -> None:
    """``x_dense``: dense time / this time (above 1: faster than the bf16 model's layer);
    ``x_dense_fp32``: the same against the fp32 model's layer (``--isa-cap`` runs);
    ``x_int4``: torch-int4's time at the same width / this time (the int4 container)."""
    dense = {(r["size"], r["rows"]): r["ms"] for r in records if r["kernel"] == LABELS["dequant"] and "ms" in r}
    fp32 = {(r["size"], r["rows"]): r["ms"] for r in records if r["kernel"] == LABELS["dequant-fp32"] and "ms" in r}
    int4 = {(r["size"], r["rows"], r["bits"]): r["ms"] for r in records if r["kernel"] == LABELS["torch-int4"] and "ms" in r}
    for r in records:
        if "ms" in r and (r["size"], r["rows"]) in dense:
            r["x_dense"] = round(dense[(r["size"], r["rows"])] / r["ms"], 2)
        if "ms" in r and (r["size"], r["rows"]) in fp32:
            r["x_dense_fp32"] = round(fp32[(r["size"], r["rows"])] / r["ms"], 2)
        if "ms" in r and (r["size"], r["rows"], r["bits"]) in int4:
            r["x_int4"] = round(int4[(r["size"], r["rows"], r["bits"])] / r["ms"], 2)


if __name__ == "__main__":
    raise SystemExit(main())
