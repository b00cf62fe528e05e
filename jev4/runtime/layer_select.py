"""Which Linear layers of the network a weight-quantization scheme replaces, chosen by module name.

Every torch quantization path (FP8 GEMMs, bitsandbytes int8/nf4) picks its
layers here, so they agree on what is quantized. Patterns are shell globs
(``fnmatch``) on full module names, e.g. ``model.language_model.layers.3.mlp.up_proj``.

Defaults: only the language model's transformer layers (q/k/v/o and the
MLP projections). Excluded whatever the include patterns say: embeddings,
norms, ``multi_vector_projector`` (the 128-d head: tiny, and its error lands
straight in the multi-vectors), ``lm_head``, and the vision tower (its last
MLP and merger already overflow fp16; see PLATFORM.md). These pick the same
layers as the ONNX Q/DQ export's defaults (``jev4.quant.recipes``; a test
checks it). A caller may pass its own patterns.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

__all__ = ["DEFAULT_EXCLUDE", "DEFAULT_INCLUDE", "LayerSelection", "replace_module", "select_linears"]

DEFAULT_INCLUDE: tuple[str, ...] = ("model.language_model.layers.*",)
DEFAULT_EXCLUDE: tuple[str, ...] = ("*embed*", "*norm*", "*multi_vector_projector*", "*lm_head*", "model.visual*")


@dataclass(frozen=True)
class LayerSelection:
    """The outcome of a selection, kept so that a caller (and the manifest/log) can say what was replaced."""

    chosen: tuple[str, ...]
    excluded: tuple[str, ...]  # Linear layers matched by an include pattern but removed by an exclude pattern
    skipped: dict[str, str]  # chosen by name, left alone for a reason (e.g. shape), name -> reason


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def select_linears(
    network: nn.Module,
    include: tuple[str, ...] = DEFAULT_INCLUDE,
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
) -> tuple[list[str], list[str]]:
    """Names of plain ``nn.Linear`` modules matching ``include`` and no ``exclude``; and those excluded.

    Only exact ``nn.Linear`` (not subclasses, not LoRA wrappers): quantize
    after the adapter is merged, never around an unmerged LoRA layer.
    """
    chosen, excluded = [], []
    for name, module in network.named_modules():
        if type(module) is not nn.Linear or not _matches(name, include):
            continue
        (excluded if _matches(name, exclude) else chosen).append(name)
    return chosen, excluded


def replace_module(network: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``name`` was (``a.b.c`` -> ``setattr(a.b, "c", new)``)."""
    parent_name, _, child = name.rpartition(".")
    parent = network.get_submodule(parent_name) if parent_name else network
    setattr(parent, child, new)
