"""Benchmark the GSQ Triton kernels (W2, W3) against cuBLAS, Marlin W4 and Humming W2/W3.

    python benchmarks/kernels.py            # all Llama-3.1 8B/70B linear shapes, M = 1..4096
    python benchmarks/kernels.py --quick    # 8192x8192 only, M in 1, 16, 4096

On a CUDA GPU it prints, per shape and M, time, TFLOPS, achieved GB/s and percent of the
device's peak memory bandwidth, checks the issue's targets and writes
``benchmarks/results/kernels_<device>.json``. Without a GPU it runs the kernels' correctness
sweep in the Triton interpreter on small shapes and writes
``benchmarks/results/kernels_cpu-interpreter.json``: timings need a GPU.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# (N = out features, K = in features) of the linear layers; "gate/up" is one of the two.
SHAPES = {
    "llama-3.1-8b": [
        ("qkv", 6144, 4096), ("o", 4096, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)
    ],
    "llama-3.1-70b": [
        ("qkv", 10240, 8192), ("o", 8192, 8192), ("gate/up", 28672, 8192), ("down", 8192, 28672)
    ],
}
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
# Peak memory bandwidth in TB/s, first match on the lower-cased device name wins.
PEAK_BANDWIDTH_TBPS = [
    (("h100", "pcie"), 2.0),
    (("h100",), 3.35),
    (("h200",), 4.8),
    (("a100", "80gb"), 2.0),
    (("a100",), 1.55),
    (("l40s",), 0.864),
    (("4090",), 1.0),
]
TARGETS = {
    "w2_over_marlin_w4_at_m1_8192x8192": 1.8,
    "w2_percent_of_peak_bandwidth_at_m1_8192x8192": 70.0,
    "w3_over_marlin_w4_at_m1_8192x8192": 1.3,
    "prefill_m4096_time_over_cublas_max": 1.2,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="8192x8192 only, M in 1, 16, 4096")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        run_gpu(args, torch.device("cuda"))
    else:
        run_interpreter_sweep(args)


# ------------------------------------------------------------------------------------------
# GPU timings
# ------------------------------------------------------------------------------------------


def run_gpu(args, device: torch.device) -> None:
    from gsq_vllm.kernels import prepare_weight, select_kernel
    from gsq_vllm.packing import code_range

    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device)
    peak, peak_source = peak_bandwidth(name)
    print(f"device: {name}; peak memory bandwidth {peak:.0f} GB/s ({peak_source})")
    shapes = [("llama-3.1-70b", "o", 8192, 8192)] if args.quick else [
        (model, layer, n, k) for model, layers in SHAPES.items() for layer, n, k in layers
    ]
    m_values = [1, 16, 4096] if args.quick else M_VALUES
    rows, checks = [], []
    for model, layer, n, k in shapes:
        print(f"\n== {model} {layer}: N={n} K={k} ==")
        candidates = {"cublas": dense_linear(n, k, dtype, device)}
        for bits in (2, 3):
            low, high = code_range(bits)
            codes = torch.randint(low, high + 1, (n, k), dtype=torch.int8, device=device)
            scales = (torch.randn(n, k // args.group_size, device=device) * 0.01).to(dtype)
            weight = prepare_weight(codes, scales, bits, args.group_size)
            check_on_gpu(weight, codes, scales, args.group_size, dtype, checks, model, layer)
            candidates[f"gsq_w{bits}"] = (gsq_runner(weight), weight_bytes(weight))
        candidates["marlin_w4"] = optional(lambda: marlin_w4(n, k, args.group_size, dtype, device))
        for bits in (2, 3):
            candidates[f"humming_w{bits}"] = optional(
                lambda bits=bits: humming(n, k, bits, args.group_size, dtype, device)
            )
        print(f"{'M':>5} {'kernel':>10} {'us':>9} {'TFLOPS':>7} {'GB/s':>7} {'%peak':>6}  note")
        for m in m_values:
            x = torch.randn(m, k, dtype=dtype, device=device)
            for label, candidate in candidates.items():
                row = {"model": model, "layer": layer, "N": n, "K": k, "M": m, "kernel": label}
                if isinstance(candidate, str):  # why it is unavailable
                    if m == m_values[0]:
                        print(f"{m:>5} {label:>10} {'-':>9}  {candidate}")
                    rows.append({**row, "unavailable": candidate})
                    continue
                run, weight_nbytes = candidate
                try:
                    seconds = time_call(run, x)
                except Exception as error:  # a third-party kernel that fails at this shape
                    reason = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
                    print(f"{m:>5} {label:>10} {'-':>9}  {reason}")
                    rows.append({**row, "unavailable": reason})
                    continue
                nbytes = weight_nbytes + x.nbytes + m * n * x.element_size()
                row.update(
                    time_us=seconds * 1e6,
                    tflops=2 * m * n * k / seconds / 1e12,
                    gbps=nbytes / seconds / 1e9,
                    percent_of_peak=100 * nbytes / seconds / 1e9 / peak,
                )
                if label.startswith("gsq"):
                    row["gsq_kernel"] = select_kernel(m)
                rows.append(row)
                print(
                    f"{m:>5} {label:>10} {row['time_us']:>9.1f} {row['tflops']:>7.1f} "
                    f"{row['gbps']:>7.0f} {row['percent_of_peak']:>6.1f}  "
                    f"{row.get('gsq_kernel', '')}"
                )
    targets = evaluate_targets(rows)
    print("\ntargets:")
    for key, value in targets.items():
        print(f"  {key}: {value}")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = args.out_dir / f"kernels_{slug}.json"
    write_json(path, {
        "mode": "gpu",
        "device": name,
        "peak_bandwidth_gbps": peak,
        "peak_bandwidth_source": peak_source,
        "dtype": args.dtype,
        "group_size": args.group_size,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "vllm": package_version("vllm"),
        "targets": targets,
        "correctness": checks,
        "results": rows,
    })
    print(f"\nwrote {path}")
    failed = [c for c in checks if not c["ok"]]
    if failed:  # timings of a wrong kernel mean nothing: fail the run
        print(f"{len(failed)}/{len(checks)} correctness checks FAILED (see 'correctness' in {path})")
        sys.exit(1)


def check_on_gpu(weight, codes, scales, group_size, dtype, checks, model, layer) -> None:
    """Our kernels against the torch reference on this GPU, for each kernel the selector uses."""
    from gsq_vllm.kernels import gsq_matmul, reference_matmul, select_kernel

    for m in (1, 8, 64):
        x = torch.randn(m, weight.in_features, dtype=dtype, device=codes.device)
        expected = reference_matmul(x, codes, scales, group_size).float()
        error = (gsq_matmul(x, weight).float() - expected).abs().max() / expected.abs().max()
        ok = error.item() <= 4 * torch.finfo(dtype).eps
        checks.append({"model": model, "layer": layer, "bits": weight.bits, "M": m,
                       "kernel": select_kernel(m), "max_rel_error": error.item(), "ok": ok})
        if not ok:
            print(f"  CHECK FAILED: W{weight.bits} M={m} ({select_kernel(m)}) error {error:.2e}")


def peak_bandwidth(device_name: str) -> tuple[float, str]:
    """Peak memory bandwidth in GB/s from the table, else measured with a large device copy."""
    lowered = device_name.lower()
    for words, tbps in PEAK_BANDWIDTH_TBPS:
        if all(word in lowered for word in words):
            return tbps * 1000, "datasheet"
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    seconds = time_call(lambda _: target.copy_(source), None)
    return 2 * source.nbytes / seconds / 1e9, "measured copy (read + write)"


def time_call(run, x) -> float:
    """Median seconds per call; CUDA graphs when they work (as vLLM decodes), else plain."""
    import triton.testing

    run(x)  # compile and autotune outside the timed region
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(lambda: run(x), rep=100) / 1e3
    except Exception:  # some third-party ops cannot be captured
        return triton.testing.do_bench(lambda: run(x), warmup=25, rep=100) / 1e3


def gsq_runner(weight):
    from gsq_vllm.kernels import gsq_matmul

    def run(x):
        return gsq_matmul(x, weight)

    return run


def weight_bytes(weight) -> int:
    tensors = [weight.low_plane, weight.high_plane, weight.scales]
    return sum(t.nbytes for t in tensors if t is not None)


def dense_linear(n, k, dtype, device):
    """The unquantized layer in the activation dtype: torch's matmul (cuBLAS)."""
    weight = torch.randn(n, k, dtype=dtype, device=device) * 0.01
    return (lambda x: torch.nn.functional.linear(x, weight), weight.nbytes)


def optional(build):
    """The candidate ``build()`` returns, or a one-line reason why it is unavailable."""
    try:
        return build()
    except Exception as error:  # a missing or incompatible third-party kernel
        return f"unavailable: {type(error).__name__}: {str(error).splitlines()[0][:160]}"


def call_with_known(fn, **values):
    """Call ``fn`` with the subset of ``values`` its signature names (vLLM's ops change)."""
    parameters = inspect.signature(fn).parameters
    missing = [
        p for p, spec in parameters.items() if p not in values and spec.default is inspect._empty
    ]
    if missing:
        raise TypeError(f"{fn.__name__} needs unknown arguments {missing}")
    return fn(**{p: v for p, v in values.items() if p in parameters})


def marlin_w4(n, k, group_size, dtype, device):
    """vLLM's GPTQ-Marlin W4A16 (uint4b8, symmetric, group-wise), checked against a reference."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils import marlin_utils
    from vllm.scalar_type import scalar_types

    from gsq_vllm.kernels import reference_matmul
    from gsq_vllm.serving.int4_packing import pack_gptq_int4

    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    scales = (torch.randn(n, k // group_size) * 0.01).to(dtype)
    qweight = pack_gptq_int4(codes).to(device)  # [K // 8, N]
    empty = torch.empty(0, dtype=torch.int, device=device)
    repacked = call_with_known(
        ops.gptq_marlin_repack, b_q_weight=qweight, perm=empty, size_k=k, size_n=n, num_bits=4,
        is_a_8bit=False,
    )
    marlin_scales = call_with_known(
        marlin_utils.marlin_permute_scales, s=scales.t().contiguous().to(device), size_k=k,
        size_n=n, group_size=group_size, is_a_8bit=False,
    )
    if hasattr(marlin_utils, "marlin_make_workspace_new"):
        workspace = marlin_utils.marlin_make_workspace_new(torch.device(device))
    else:
        workspace = marlin_utils.marlin_make_workspace(n, torch.device(device))

    def run(x):
        return call_with_known(
            ops.gptq_marlin_gemm, a=x, c=None, b_q_weight=repacked, b_bias=None,
            b_scales=marlin_scales, a_scales=None, global_scale=None, b_zeros=None, g_idx=None,
            perm=None, workspace=workspace, b_q_type=scalar_types.uint4b8, size_m=x.shape[0],
            size_n=n, size_k=k, is_k_full=True, use_atomic_add=False, use_fp32_reduce=True,
            is_zp_float=False,
        )

    x = torch.randn(16, k, dtype=dtype, device=device)
    expected = reference_matmul(x.cpu(), codes, scales, group_size).float()
    error = (run(x).cpu().float() - expected).abs().max().item()
    if error > 1e-2 * expected.abs().max().item() + 1e-3:
        raise RuntimeError(f"Marlin output does not match the reference (max error {error:.3g})")
    return run, qweight.nbytes + scales.nbytes


def humming(n, k, bits, group_size, dtype, device):
    """Humming's W{bits}A16 dense GEMM with random weights (timing only), as its own benchmark."""
    from humming.layer import HummingLayer
    from humming.testing import random_fill_tensor
    from humming.tune import get_heuristics_config

    scale_dtype = "float16" if dtype == torch.float16 else "bfloat16"
    layer = HummingLayer(
        shape_n=n, shape_k=k, num_experts=0,
        weight_config={"dtype": f"int{bits}", "group_size": group_size, "scale_dtype": scale_dtype,
                       "has_zero_point": False, "is_fp_zero_point": False},
        input_config={"dtype": scale_dtype, "group_size": 0},
        torch_dtype=dtype,
    ).to(device)
    for tensor in layer.parameters():
        random_fill_tensor(tensor)
    layer.transform()
    tuning = json.dumps(
        get_heuristics_config(
            layer_config=layer.humming_config, use_f16_accum=False, use_m_major_input_scale=False
        )
    )
    compute = json.dumps(
        {"use_f16_accum": False, "use_m_major_input_scale": False, "gemm_type": "dense"}
    )
    nbytes = sum(t.nbytes for t in layer.state_dict().values())
    return (lambda x: layer(inputs=x, compute_config=compute, tuning_config=tuning), nbytes)


def evaluate_targets(rows) -> dict:
    def time_of(kernel, m, n, k):
        for row in rows:
            same = (row["kernel"], row["M"], row["N"], row["K"]) == (kernel, m, n, k)
            if same and "time_us" in row:
                return row["time_us"], row
        return None, None

    report = {"thresholds": TARGETS}
    marlin, _ = time_of("marlin_w4", 1, 8192, 8192)
    w2, w2_row = time_of("gsq_w2", 1, 8192, 8192)
    w3, _ = time_of("gsq_w3", 1, 8192, 8192)
    if w2_row:
        report["w2_percent_of_peak_bandwidth_at_m1_8192x8192"] = round(w2_row["percent_of_peak"], 1)
    if marlin and w2:
        report["w2_over_marlin_w4_at_m1_8192x8192"] = round(marlin / w2, 2)
    if marlin and w3:
        report["w3_over_marlin_w4_at_m1_8192x8192"] = round(marlin / w3, 2)
    prefill = {}
    for row in rows:
        if row["M"] == 4096 and row["kernel"].startswith("gsq") and "time_us" in row:
            dense, _ = time_of("cublas", 4096, row["N"], row["K"])
            if dense:
                prefill[f"{row['kernel']} {row['N']}x{row['K']}"] = round(row["time_us"] / dense, 2)
    if prefill:
        report["prefill_m4096_time_over_cublas"] = prefill
    met = {}
    for key, threshold in TARGETS.items():
        value = report.get(key)
        if key == "prefill_m4096_time_over_cublas_max":
            met[key] = max(prefill.values()) <= threshold if prefill else None
        elif value is not None:
            met[key] = value >= threshold
        else:
            met[key] = None  # not measured (e.g. Marlin unavailable)
    report["met"] = met
    return report


# ------------------------------------------------------------------------------------------
# CPU: correctness in the Triton interpreter
# ------------------------------------------------------------------------------------------


def run_interpreter_sweep(args) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules import triton
    from gsq_vllm.kernels import gsq_matmul, prepare_weight, reference_matmul, select_kernel
    from gsq_vllm.kernels.reference import exact_problem

    print("No CUDA device: running the correctness sweep in the Triton interpreter.")
    print("Timings need a GPU; the numbers below are correctness only.\n")
    n, k = 72, 256  # N not a multiple of any block; K holds 2..8 groups
    rows = []
    started = time.time()
    header = ["bits", "group", "dtype", "M", "kernel", "exact", "rel.err"]
    widths = [4, 5, 8, 3, 12, 5, 8]
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    for bits in (2, 3, 4):
        for group_size in (32, 64, 128):
            for dtype in (torch.float16, torch.bfloat16):
                for m in (1, 2, 5, 16, 33):
                    seed = bits * 1000 + group_size + m
                    codes, scales, x = exact_problem(m, n, k, bits, group_size, dtype, seed)
                    exact = torch.equal(
                        gsq_matmul(x, prepare_weight(codes, scales, bits, group_size)),
                        reference_matmul(x, codes, scales, group_size),
                    )
                    # realistic data: Gaussian activations, small scales of both signs
                    gen = torch.Generator().manual_seed(seed)
                    x = torch.randn(m, k, generator=gen).to(dtype)
                    scales = (torch.randn(n, k // group_size, generator=gen) * 0.02).to(dtype)
                    out = gsq_matmul(x, prepare_weight(codes, scales, bits, group_size)).float()
                    expected = reference_matmul(x, codes, scales, group_size).float()
                    rel_err = ((out - expected).abs().max() / expected.abs().max()).item()
                    ok = exact and rel_err <= 4 * torch.finfo(dtype).eps
                    rows.append({
                        "bits": bits, "group_size": group_size, "dtype": str(dtype).split(".")[1],
                        "M": m, "N": n, "K": k, "kernel": select_kernel(m),
                        "exact_match": exact, "realistic_max_rel_error": rel_err, "ok": ok,
                    })
                    print(f"{bits:>4} {group_size:>5} {rows[-1]['dtype']:>8} {m:>3} "
                          f"{rows[-1]['kernel']:>12} {str(exact):>5} {rel_err:>8.1e}")
    passed = sum(row["ok"] for row in rows)
    print(f"\n{passed}/{len(rows)} cases correct ({time.time() - started:.0f} s). "
          "Timings need a GPU: run this script on one.")
    path = args.out_dir / "kernels_cpu-interpreter.json"
    write_json(path, {
        "mode": "cpu-interpreter",
        "note": "Correctness only (Triton interpreter on the CPU); timings need a CUDA GPU.",
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "passed": passed,
        "total": len(rows),
        "results": rows,
    })
    print(f"wrote {path}")
    if passed != len(rows):
        sys.exit(1)


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
