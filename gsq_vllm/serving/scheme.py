"""``CompressedTensorsGSQ``: the compressed-tensors scheme for 2/3-bit symmetric weight-only layers.

Parameters are created exactly as they are on disk (``weight_packed``, ``weight_scale``,
``weight_shape``), so existing checkpoints load unchanged. After loading, the scheme

1. checks that every tensor (and every fused shard: q/k/v, gate/up) came from the checkpoint,
2. unpacks ``weight_packed`` in the layout its width shows (dense or word-aligned 3-bit),
3. keeps this rank's input columns for row-parallel layers (``sharding.py``),
4. hands int8 codes ``[N, K]`` and scales ``[N, K // group]`` to the chosen kernel, which repacks
   them once into its own layout (see ``kernels/``).

Every failure names the layer and the expected vs found shapes, and happens at load time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vllm.logger import init_logger
from vllm.model_executor.kernels.linear import MPLinearLayerConfig
from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsScheme
from vllm.model_executor.parameter import BasevLLMParameter, ChannelQuantScaleParameter, GroupQuantScaleParameter
from vllm.scalar_type import scalar_types

from gsq_vllm.packing import PackLayout, unpack_codes
from gsq_vllm.weight_format import SERVED_BITS
from gsq_vllm.serving.linear_kernels import choose_gsq_kernel
from gsq_vllm.serving.parameters import GSQPackedWeightParameter, initial_packed_width
from gsq_vllm.serving.sharding import plan_input_shard, take_input_shard

logger = init_logger(f"vllm.{__name__}")  # under "vllm": shown by vLLM's log config

#: vLLM's name for a code stored unsigned with a bias of 2**(bits-1) (the compressed-tensors form)
GSQ_SCALAR_TYPES = {2: scalar_types.uint2b2, 3: scalar_types.uint3b4, 4: scalar_types.uint4b8}
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}


class GSQLoadError(ValueError):
    """A checkpoint tensor that is missing or does not match the layer."""


class CompressedTensorsGSQ(CompressedTensorsScheme):
    """Weight-only ``num_bits`` in (2, 3, 4), symmetric, group- or channel-wise, pack-quantized."""

    def __init__(
        self,
        num_bits: int,
        strategy: str,
        group_size: int | None,
        layer_name: str | None,
        layout_hint: PackLayout | None = None,
    ):
        name = layer_name or "<unnamed layer>"
        if num_bits not in SERVED_BITS:
            raise GSQLoadError(
                f"{name}: num_bits {num_bits} is not served by the gsq plugin "
                f"(supported: {', '.join(map(str, SERVED_BITS))}; 8 bits go to stock vLLM)"
            )
        if strategy not in ("group", "channel"):
            raise GSQLoadError(f"{name}: strategy {strategy!r} is not supported (expected 'group' or 'channel')")
        if strategy == "group" and not group_size:
            raise GSQLoadError(f"{name}: strategy 'group' needs a group_size")
        self.num_bits = num_bits
        self.strategy = strategy
        self.group_size = group_size if strategy == "group" else None
        self.layer_name = name
        self.layout_hint = layout_hint

    @classmethod
    def get_min_capability(cls) -> int:
        return -1  # the kernel selector decides per platform

    def create_weights(
        self,
        layer: torch.nn.Module,
        output_size: int,
        input_size: int,
        output_partition_sizes: list[int],
        input_size_per_partition: int,
        params_dtype: torch.dtype,
        weight_loader: Callable,
        **kwargs,
    ) -> None:
        out_pp = sum(output_partition_sizes)
        shard = plan_input_shard(
            self.layer_name, input_size, input_size_per_partition, _tp_rank(), self.group_size
        )
        layer.input_size_per_partition = input_size_per_partition
        layer.output_size_per_partition = out_pp
        layer.output_partition_sizes = output_partition_sizes
        layer.params_dtype = params_dtype
        layer.gsq_shard = shard
        layer.gsq_loaded = {"weight_packed": set(), "weight_scale": set(), "weight_shape": set()}

        config = MPLinearLayerConfig(
            full_weight_shape=(input_size, output_size),
            partition_weight_shape=(input_size_per_partition, out_pp),
            weight_type=GSQ_SCALAR_TYPES[self.num_bits],
            act_type=params_dtype,
            group_size=shard.group_size if shard.group_size < input_size else input_size_per_partition,
            zero_points=False,
        )
        kernel_cls = choose_gsq_kernel(config, self.layer_name)
        self.kernel = kernel_cls(config, layer_name=self.layer_name)

        weight = GSQPackedWeightParameter(
            data=torch.empty(out_pp, initial_packed_width(input_size, self.num_bits), dtype=torch.int32),
            weight_loader=_recording(layer, "weight_packed", weight_loader),
            layer_name=self.layer_name,
            num_bits=self.num_bits,
            input_size=input_size,
            layout_hint=self.layout_hint,
        )
        scale_data = torch.empty(out_pp, shard.scale_columns, dtype=params_dtype)
        on_disk_columns = shard.input_size // shard.group_size
        scale_loader = _recording(
            layer, "weight_scale", _checked_scale_loader(self.layer_name, on_disk_columns, weight_loader)
        )
        if shard.group_size < input_size:
            scale = GroupQuantScaleParameter(output_dim=0, input_dim=1, data=scale_data, weight_loader=scale_loader)
        else:  # channel-wise: one scale per row, the same on every row-parallel rank
            scale = ChannelQuantScaleParameter(output_dim=0, data=scale_data, weight_loader=scale_loader)
        shape = BasevLLMParameter(
            data=torch.zeros(2, dtype=torch.int64),
            weight_loader=_recording(layer, "weight_shape", weight_loader),
        )
        layer.register_parameter("weight_packed", weight)
        layer.register_parameter("weight_scale", scale)
        layer.register_parameter("weight_shape", shape)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        shard = layer.gsq_shard
        _check_all_loaded(self.layer_name, layer)
        in_features = int(layer.weight_shape.data[1])
        if in_features != shard.input_size:
            raise GSQLoadError(
                f"{self.layer_name}: weight_shape says in_features {in_features}, "
                f"the model expects {shard.input_size}"
            )
        packed: GSQPackedWeightParameter = layer.weight_packed
        codes = unpack_codes(
            packed.data, self.num_bits, shard.input_size, packed.pack_layout, name=f"{self.layer_name}.weight_packed"
        )
        codes = take_input_shard(codes, shard)
        scales = layer.weight_scale.data
        for name in ("weight_packed", "weight_scale", "weight_shape"):
            delattr(layer, name)
        del layer.gsq_loaded
        layer.gsq_codes, layer.gsq_scales = codes, scales  # the kernels' common input
        self.kernel.process_weights_after_loading(layer)

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.kernel.apply_weights(layer, x, bias)


def _tp_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


def _recording(layer: torch.nn.Module, name: str, loader: Callable) -> Callable:
    """Wrap a weight loader so that the scheme can tell, after loading, what never arrived."""

    def load(param, loaded_weight, *args, **kwargs):
        shard_id = args[0] if args else kwargs.get("loaded_shard_id")
        loader(param, loaded_weight, *args, **kwargs)
        layer.gsq_loaded[name].add(shard_id)

    return load


def _checked_scale_loader(layer_name: str, columns: int, loader: Callable) -> Callable:
    """Check the checkpoint's scale columns (vLLM would silently cut a too-wide tensor for a
    row-parallel layer) and turn vLLM's bare shape assertions into errors that name the layer."""

    def load(param, loaded_weight, *args, **kwargs):
        if loaded_weight.ndim != 2 or loaded_weight.shape[1] != columns:
            raise GSQLoadError(
                f"{layer_name}.weight_scale: expected [out, {columns}] (in_features / group_size), "
                f"found shape {list(loaded_weight.shape)}"
            )
        try:
            loader(param, loaded_weight, *args, **kwargs)
        except (AssertionError, RuntimeError) as err:
            raise GSQLoadError(
                f"{layer_name}.weight_scale: checkpoint shape {list(loaded_weight.shape)} does not fit "
                f"this layer's scales {list(param.data.shape)} (per rank)"
            ) from err

    return load


def _expected_shards(layer: torch.nn.Module) -> set:
    return set(range(len(layer.output_partition_sizes)))


def _check_all_loaded(layer_name: str, layer: torch.nn.Module) -> None:
    expected = _expected_shards(layer)
    for name in ("weight_packed", "weight_scale", "weight_shape"):
        seen = layer.gsq_loaded[name]
        if not seen:
            raise GSQLoadError(f"{layer_name}: the checkpoint has no {layer_name}.{name}")
        if None in seen or name == "weight_shape":
            continue
        got = set()
        for shard_id in seen:
            ids = shard_id if isinstance(shard_id, tuple) else (shard_id,)
            got.update(_QKV_INDEX.get(i, i) for i in ids)
        missing = expected - got
        if missing:
            raise GSQLoadError(
                f"{layer_name}: {name} of fused shard(s) {sorted(missing)} missing from the checkpoint "
                f"(loaded shards {sorted(got)} of {sorted(expected)})"
            )
