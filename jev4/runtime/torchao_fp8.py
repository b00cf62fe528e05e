"""FP8 through torchao: ``quantize_(network, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))``.

Why beside ``jev4.runtime.torch_fp8`` (jev4's own ``_scaled_mm`` layers):
the same scheme (E4M3 weights with one scale per output channel, per-token
dynamic activation scales, fast accumulation), but expressed as torchao
tensor subclasses that ``torch.compile`` traces through, so inductor can
fuse each activation quantization into the op that produces it (RMSNorm,
SiLU x up, the attention output) instead of running it as separate passes
(the reason jev4's eager FP8 path stops at 1.2x bf16, docs/benchmarks.md).
It is therefore only used compiled: ``jev4.runtime.load(...,
quantization="fp8-torchao")`` always goes through the bucketed compiled
path (``jev4.runtime.torch_compiled``). Which of the two FP8 paths wins is
for the GPU measurements to say (issue 17); both stay until then.

GPU only: torchao's float8 inference path targets CUDA GPUs of compute
capability >= 8.9; on any other device ``check_torchao_fp8`` refuses before a
weight is read. torchao is optional (``pip install 'jev4[torchao]'``, pinned
to the version checked against torch 2.13 here: it installs as a
pure-Python abi3 wheel with no dependencies, so it cannot pull another torch).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from jev4.errors import ProviderError
from jev4.runtime.layer_select import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, LayerSelection, select_linears
from jev4.runtime.torch_fp8 import QuantizationError, check_fp8_device

log = logging.getLogger(__name__)

__all__ = ["TORCHAO_FP8", "TORCHAO_PIP", "TorchaoFP8Settings", "check_torchao_fp8", "import_torchao", "quantize_model_torchao_fp8"]

TORCHAO_FP8 = "fp8-torchao"
TORCHAO_PIP = "pip install 'torchao==0.18.0'"  # the version whose API this module is written against


@dataclass(frozen=True)
class TorchaoFP8Settings:
    """Which Linear layers torchao quantizes (same default selection as jev4's FP8 path); serialisable."""

    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    granularity: str = "row"
    version: int = 1

    def __post_init__(self) -> None:
        if self.granularity != "row":
            raise QuantizationError(f"torchao FP8 is wired for row-wise scales only (as jev4's FP8 path), got granularity {self.granularity!r}")

    def to_json(self) -> dict:
        return {"scheme": "fp8-e4m3-torchao", **asdict(self), "include": list(self.include), "exclude": list(self.exclude)}


@dataclass(frozen=True)
class TorchaoSelection:
    """What ``quantize_model_torchao_fp8`` did: the layers and the settings, for the encoder's report."""

    selection: LayerSelection
    settings: TorchaoFP8Settings
    torchao_version: str

    def to_json(self) -> dict:
        return {**self.settings.to_json(), "torchao": self.torchao_version, "layers": len(self.selection.chosen)}


def import_torchao():
    """The ``torchao`` module, or an ImportError that gives the pip command."""
    try:
        import torchao
    except ImportError as exc:
        raise ImportError(f"quantization={TORCHAO_FP8!r} needs torchao: {TORCHAO_PIP}") from exc
    return torchao


def check_torchao_fp8(device: torch.device | str, dtype: torch.dtype) -> None:
    """Refuse what torchao's FP8 path cannot run, before any weight is read: a non-CUDA device, an old GPU, not bf16, no torchao."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ProviderError(
            f"quantization={TORCHAO_FP8!r} runs torchao's float8 kernels on a CUDA GPU (compute capability >= 8.9); "
            f"device is {str(device)!r} (no CUDA GPU). On CPU use quantization='fp8' (jev4's _scaled_mm path) or none"
        )
    check_fp8_device(device)  # no GPU visible, or compute capability < 8.9: named in the message
    if dtype != torch.bfloat16:
        raise QuantizationError(f"quantization={TORCHAO_FP8!r} computes in bf16; pass dtype='bf16', not {dtype}")
    import_torchao()


def quantize_model_torchao_fp8(network: nn.Module, settings: TorchaoFP8Settings = TorchaoFP8Settings()) -> TorchaoSelection:
    """Quantize the selected Linear layers of a merged network in place with torchao (row-wise FP8, dynamic activations)."""
    torchao = import_torchao()
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    chosen, excluded = select_linears(network, settings.include, settings.exclude)
    if not chosen:
        raise QuantizationError(f"no nn.Linear layer matches include={settings.include} outside exclude={settings.exclude}")
    device = network.get_submodule(chosen[0]).weight.device
    if device.type != "cuda":
        raise ProviderError(f"torchao FP8 quantizes a network on a CUDA GPU; this one is on {str(device)!r} (no CUDA GPU)")
    check_fp8_device(device)
    wanted = set(chosen)
    quantize_(network, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=lambda module, fqn: fqn in wanted)
    log.info("torchao %s FP8 (row-wise): %d Linear layers quantized, %d excluded by pattern", torchao.__version__, len(chosen), len(excluded))
    return TorchaoSelection(LayerSelection(tuple(chosen), tuple(excluded), {}), settings, torchao.__version__)
