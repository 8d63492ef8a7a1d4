"""Fixtures of the serving tests (helpers live in ``serving_support.py``)."""

from __future__ import annotations

import pytest

from serving_support import free_port


@pytest.fixture(scope="session")
def vllm_tp1():
    """A real vLLM process group of one rank (gloo, loopback) and a default VllmConfig in context,
    as vLLM's linear layers and parameters need; the plugin is registered."""
    pytest.importorskip("vllm")
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.platforms import current_platform

    import gsq_vllm.serving

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{free_port()}",
            local_rank=0,
            backend="gloo",
        )
        ensure_model_parallel_initialized(1, 1)
        current_platform.import_kernels()
        gsq_vllm.serving.register()
        torch.manual_seed(0)
        yield


