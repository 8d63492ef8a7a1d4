"""int4 container on the CPU with vLLM's own CPU WNA16 kernel (the one stock GPTQ W4A16 uses).

Layout: int8 codes ``[N, K]`` (scheme) -> GPTQ int4 parameters (:mod:`.int4_container`) ->
vLLM's ``CPUWNA16LinearKernel``, which repacks into its 16-column blocked layout (or the W4A8 AMX
layout when ``VLLM_CPU_INT4_W4A8`` is set, the default on AMX CPUs with bf16) and runs
``cpu_gemm_wna16``.

vLLM builds the ``cpu_gemm_wna16`` op only into its AVX-512 library, and for 16-bit activations
only: on an AVX2-only CPU, or with fp32 activations, this kernel (like stock GPTQ W4A16) is
unavailable, and ``can_implement`` says why.
"""

from __future__ import annotations

import torch
from vllm.model_executor.kernels.linear import MPLinearLayerConfig
from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
from vllm.platforms import current_platform

from gsq_vllm.serving.linear_kernels.int4_container import GSQInt4ContainerKernel, int4_config
from gsq_vllm.serving.vllm_compat import cpu_wna16_op_available

#: activation dtypes vLLM's cpu_gemm_wna16 op is compiled for (vllm-cpu 0.32: "not implemented for 'Float'")
OP_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)


class GSQCPUWNA16LinearKernel(GSQInt4ContainerKernel):
    name = "cpu-wna16"

    @classmethod
    def stock_kernel(cls):
        return CPUWNA16LinearKernel

    @classmethod
    def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        if not current_platform.is_cpu():
            return False, "cpu-wna16 runs on the CPU only"
        if not cpu_wna16_op_available():
            return False, "this vLLM build has no cpu_gemm_wna16 op (vLLM compiles it for AVX-512 CPUs only)"
        if c.act_type not in OP_ACTIVATION_DTYPES:
            return False, (f"cpu_gemm_wna16 has no {c.act_type} implementation "
                           f"(it runs {', '.join(map(str, OP_ACTIVATION_DTYPES))} activations)")
        return CPUWNA16LinearKernel.can_implement(int4_config(c))
