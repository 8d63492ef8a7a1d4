"""The plugin's registration (gsq_vllm.serving, vllm_compat) and which checkpoints it claims (claim,
config.override_quantization_method), in the serving environment."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.serve
vllm = pytest.importorskip("vllm")

import importlib.metadata

from serving_support import quant_config, run_python  # noqa: E402

def test_entry_point_is_declared():
    points = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(p.name == "gsq" and p.value == "gsq_vllm.serving:register" for p in points)


def test_vllm_plugin_loading_registers_gsq_once():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm.plugins import load_general_plugins

    import gsq_vllm.serving
    from gsq_vllm.serving.config import GSQQuantizationConfig

    load_general_plugins()
    gsq_vllm.serving.register()
    gsq_vllm.serving.register()
    assert QUANTIZATION_METHODS.count("gsq") == 1
    assert get_quantization_config("gsq") is GSQQuantizationConfig


def test_disable_env_registers_nothing():
    result = run_python(
        "import gsq_vllm.serving as s; s.register();"
        "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS;"
        "print('REGISTERED' if 'gsq' in QUANTIZATION_METHODS else 'STOCK')",
        env={"GSQ_VLLM_DISABLE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "STOCK"


def test_override_claims_2_3_bit_only(monkeypatch):
    from gsq_vllm.serving.config import GSQQuantizationConfig

    monkeypatch.delenv("GSQ_VLLM_DISABLE", raising=False)
    assert GSQQuantizationConfig.override_quantization_method(quant_config(2), None) == "gsq"
    assert GSQQuantizationConfig.override_quantization_method(quant_config(3), None) == "gsq"
    assert GSQQuantizationConfig.override_quantization_method(quant_config(4), None) is None
    assert GSQQuantizationConfig.override_quantization_method(quant_config(4), "gsq") == "gsq"


def test_registration_failures_leave_vllm_as_it_was(monkeypatch, caplog):
    """A moved API, a missing dependency or an unsupported vLLM: register() never raises, warns
    once (naming the cause and the supported versions) and registers nothing."""
    import logging

    import gsq_vllm.serving as serving
    from gsq_vllm.serving import vllm_compat

    def broken():
        raise ImportError("cannot import name 'register_quantization_config' (moved)")

    monkeypatch.setattr(serving, "_register_method", broken)
    monkeypatch.setattr(serving, "_failure_reported", False)
    monkeypatch.delenv("GSQ_VLLM_DISABLE", raising=False)
    with caplog.at_level(logging.WARNING, logger="vllm.gsq_vllm.serving"):
        serving.register()
        serving.register()  # vLLM may call a plugin more than once per process
    warnings = [r.getMessage() for r in caplog.records if "GSQ vLLM plugin not loaded" in r.getMessage()]
    assert len(warnings) == 1
    assert "ImportError: cannot import name 'register_quantization_config' (moved)" in warnings[0]
    assert "Supported vLLM versions: >=0.32,<0.34" in warnings[0]

    caplog.clear()
    monkeypatch.setattr(serving, "_failure_reported", False)
    monkeypatch.setattr(serving, "_register_method", lambda: pytest.fail("registered on an unsupported vLLM"))
    monkeypatch.setattr(vllm_compat, "vllm_version", lambda: "0.40.1")
    with caplog.at_level(logging.WARNING, logger="vllm.gsq_vllm.serving"):
        serving.register()
    assert any("vLLM 0.40.1 is not a supported version" in r.getMessage() for r in caplog.records)


def test_installed_vllm_is_supported():
    from gsq_vllm.serving import vllm_compat

    vllm_compat.check_supported_version(vllm_compat.vllm_version())
