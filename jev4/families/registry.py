"""Which model family a checkpoint belongs to, read from its ``config.json``'s ``model_type``.

Every family is one entry of :data:`FAMILIES`. The loaders are named as
``"module:attribute"`` strings and imported only when called, so that asking
"which family is this directory?" (the CLI does it before any work) costs a
JSON read, not an import of torch and transformers for every family.
Adding a family means writing its room (``jev4/families/<name>/``) and adding
one entry to :data:`FAMILIES`; nothing else asks ``model_type`` directly.
``jev4-export``, ``jev4.runtime.load`` and ``jev4 validate`` ask
:func:`local_family` and hand a checkpoint or artifact of a family with
hooks (``exporter``, ``runtime_loader``, ``validator``) to those hooks.

jina-embeddings-v4 still lives in ``jev4.model`` (its move into a room comes
later, without changing an output); its entry points there and its hooks are
empty: it is the built-in path of the export, runtime and validate layers,
which also serve what is v4's alone (hub ids, text-only and GGUF exports).
Its tiny writer takes a ``TinySpec`` rather than a head size, so
:func:`write_v4_tiny` below translates the CLI's ``--head-dim``; it moves into
v4's room with the rest.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jev4.errors import ConfigError, SettingsError
from jev4.json_object import read_json_object

log = logging.getLogger(__name__)

__all__ = ["FAMILIES", "Family", "family_named", "family_names", "family_of", "local_family", "write_v4_tiny"]

CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class Family:
    """One model family: how to recognise its checkpoints, load its reference encoder and write its tiny checkpoint.

    ``reference`` and ``tiny_writer`` are ``"module:attribute[.attribute]"``
    paths, resolved at call time (see the module docstring for why).
    ``reference(model_dir, dtype=..., device=...)`` returns an object with
    ``encode_text`` / ``encode_image``; ``tiny_writer(out, seed=..., force=...,
    **tiny_options)`` writes a toy checkpoint in the family's exact layout and
    returns its path. ``tiny_options`` names the extra keyword options the
    writer takes (the CLI refuses the others for this family).

    The hooks, empty for the family whose paths are jev4's built-in ones:
    ``exporter(args) -> Path`` runs ``jev4-export`` (``args``: its parsed
    options) and returns the artifact; ``runtime_loader(root, request) ->
    Encoder`` is ``jev4.runtime.load`` on a checkpoint or artifact of the
    family (``request``: a ``jev4.runtime.loader.LoadRequest``);
    ``validator(args) -> report`` runs ``jev4 validate`` (the report has
    ``passed``, ``checks`` and ``failures`` as v4's does).
    """

    name: str
    model_types: tuple[str, ...]
    reference: str
    tiny_writer: str
    description: str
    tiny_options: tuple[str, ...] = ()
    exporter: str = ""
    runtime_loader: str = ""
    validator: str = ""

    def __post_init__(self):
        if not self.model_types:
            raise SettingsError(f"family {self.name!r}: model_types is empty")
        targets = {"reference": self.reference, "tiny_writer": self.tiny_writer, "exporter": self.exporter, "runtime_loader": self.runtime_loader, "validator": self.validator}
        for label, target in targets.items():
            if (target or label in ("reference", "tiny_writer")) and target.count(":") != 1:
                raise SettingsError(f"family {self.name!r}: {label} {target!r} must read 'module:attribute'")

    def export(self, args: Any) -> Path:
        """``jev4-export`` on a checkpoint of this family (``args``: the parsed options); the artifact's path."""
        return Path(self._hook("exporter", self.exporter)(args))

    def load_runtime(self, root: Path, request: Any) -> Any:
        """``jev4.runtime.load`` on a checkpoint or artifact of this family."""
        return self._hook("runtime_loader", self.runtime_loader)(root, request)

    def validate(self, args: Any) -> Any:
        """``jev4 validate`` with a reference of this family; its report."""
        return self._hook("validator", self.validator)(args)

    def _hook(self, label: str, target: str) -> Callable[..., Any]:
        if not target:
            raise SettingsError(f"family {self.name!r} has no {label}: its checkpoints take jev4's built-in path")
        return _resolve(target)

    def load_reference(self, model_dir: str | Path, dtype: str = "fp32", device: str = "cpu") -> Any:
        """The family's torch reference encoder on ``model_dir``."""
        return _resolve(self.reference)(model_dir, dtype=dtype, device=device)

    def write_tiny(self, out: str | Path, seed: int = 0, force: bool = False, **options: Any) -> Path:
        """Write the tiny checkpoint to ``out``; ``options`` must be among ``tiny_options``."""
        unknown = sorted(set(options) - set(self.tiny_options))
        if unknown:
            accepted = ", ".join(self.tiny_options) or "none"
            raise SettingsError(f"{self.name} tiny checkpoint: unknown option(s) {', '.join(unknown)} (it takes: {accepted})")
        return Path(_resolve(self.tiny_writer)(out, seed=seed, force=force, **options))


def _resolve(target: str) -> Callable[..., Any]:
    """``"pkg.module:Class.method"`` -> the object it names."""
    module_name, _, attributes = target.partition(":")
    value: Any = importlib.import_module(module_name)
    for attribute in attributes.split("."):
        value = getattr(value, attribute)
    return value


def write_v4_tiny(out: str | Path, seed: int = 0, force: bool = False, layout: str = "old", head_dim: int = 16) -> Path:
    """jina-embeddings-v4's tiny writer with the head size as a number (``jev4.model.tiny.TINY_SPECS``)."""
    from jev4.model.tiny import TINY_SPECS, write_tiny_checkpoint

    if head_dim not in TINY_SPECS:
        raise SettingsError(f"head_dim {head_dim!r}: the jina-embeddings-v4 tiny checkpoint has head sizes {sorted(TINY_SPECS)}")
    return write_tiny_checkpoint(out, seed=seed, layout=layout, spec=TINY_SPECS[head_dim], force=force)


# One entry per family. model_type sources: jina-embeddings-v4 "qwen2_5_vl" (shared/UPSTREAM.md, config.json);
# jina-clip-v2 "jina_clip" (shared/CLIP_V2.md; jev4.families.jina_clip_v2.config.MODEL_TYPE, checked by a test).
FAMILIES: tuple[Family, ...] = (
    Family("jina-embeddings-v4", ("qwen2_5_vl",), "jev4.model.encoder:TorchEncoder.from_pretrained", "jev4.families.registry:write_v4_tiny", "3.8B Qwen2.5-VL text+image model with task LoRAs, single and multi-vector outputs", ("layout", "head_dim")),
    Family(
        "jina-clip-v2", ("jina_clip",), "jev4.families.jina_clip_v2.encoder:ClipV2Encoder.from_pretrained", "jev4.families.jina_clip_v2.tiny:write_tiny_checkpoint",
        "0.9B two-tower model: jina-xlm-roberta text (one merged LoRA) + EVA02-L/14 vision, Matryoshka 1024..32",
        exporter="jev4.families.jina_clip_v2.commands:export", runtime_loader="jev4.families.jina_clip_v2.loading:load", validator="jev4.families.jina_clip_v2.commands:validate",
    ),
)


def _known(families: tuple[Family, ...] = FAMILIES) -> str:
    return ", ".join(f"{t!r} ({f.name})" for f in families for t in f.model_types)


def family_names() -> tuple[str, ...]:
    """The families' names, in registry order (the first is the default)."""
    return tuple(f.name for f in FAMILIES)


def family_named(name: str) -> Family:
    """The family called ``name``; an unknown name is a one-line error listing the known ones."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise SettingsError(f"unknown model family {name!r}; known: {', '.join(family_names())}")


def family_of(model_dir: str | Path) -> Family:
    """The family of the checkpoint in ``model_dir``, from ``config.json``'s ``model_type``."""
    path = Path(model_dir) / CONFIG_NAME
    raw = read_json_object(path, ConfigError, f"not found (is {model_dir} a model checkpoint?)")
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError(f"{path}: no model_type, so its model family is unknown; known model_type values: {_known()}")
    if not isinstance(model_type, str):
        raise ConfigError(f"{path}: model_type must be a string, got {type(model_type).__name__}; known model_type values: {_known()}")
    for family in FAMILIES:
        if model_type in family.model_types:
            log.debug("%s: model_type %r -> %s", path, model_type, family.name)
            return family
    raise ConfigError(f"{path}: unknown model_type {model_type!r}; known model_type values: {_known()}")


def local_family(path: str | Path) -> Family | None:
    """The family of a local directory whose config.json names a registered ``model_type`` and that has hooks; else None.

    None means "jev4's built-in path": a hub id, a directory without
    config.json, a config.json that cannot be read (the built-in path then
    names the problem in its own words), a v4 checkpoint, or a ``model_type``
    that only v4's own exports write (``qwen2`` of a text-only export).
    """
    root = Path(path).expanduser()
    if not (root / CONFIG_NAME).is_file():
        return None
    try:
        family = family_of(root)
    except ConfigError:
        return None
    return family if (family.exporter or family.runtime_loader or family.validator) else None
