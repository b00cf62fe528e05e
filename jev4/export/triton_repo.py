"""``jev4 triton-repo ART OUT``: a Triton model repository for a jev4 ONNX artifact.

The repository serves text through an ensemble ``jev4`` (string inputs
``TEXT``, ``PROMPT_NAME``, ``TRUNCATE_DIM``; outputs ``SINGLE``, ``MULTI``
zero-padded, ``LENGTHS``) of three models:

- ``preprocess`` (python backend): prompts and tokenizer (the artifact's
  ``tokenizer.json``, copied in; prefixes and pad id from jev4's tables);
- ``language``: the artifact's ``language.onnx`` on ``onnxruntime_onnx``
  (or, ``--language-backend python``, on onnxruntime inside the python
  backend, for Tritons built without the onnxruntime backend). The graph is
  wrapped so that Triton can batch it: ``position_ids`` batch-first
  ([B, 3, T], transposed inside) and, for artifacts with images, the
  ``image_embeds`` input replaced by an empty constant (text requests have no
  image tokens);
- ``pool`` (python backend): Matryoshka truncation and token counts (the
  graph already pools, projects and normalises).

Engines from ``jev4 build-engine`` get a ``language_trt`` model
(``tensorrt_plan``) with the graph's own inputs ([3, B, T] position ids, so
no Triton batching); it is not part of the ensemble.

Every config.pbtxt is built as Triton's own ``ModelConfig`` protobuf
(``tritonclient``'s copy of Triton's schema), written as text, parsed back
and checked across models (ensemble tensor names, dtypes and ranks against
the member models). Output is written aside and published whole
(``jev4.atomic``), with a manifest of checksums.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from jev4.atomic import atomic_output_dir, claim_output
from jev4.errors import ManifestError, MissingDependencyError, SettingsError
from jev4.export.manifest import MANIFEST_NAME, Manifest, verify_manifest, write_manifest
from jev4.model.config import load_config
from jev4.model.preprocess import PREFIXES, QUERY_ONLY_TASKS

log = logging.getLogger(__name__)

KINDS = ("cpu", "gpu")
LANGUAGE_BACKENDS = ("onnxruntime", "python")
INSTALL_HINT = "pip install 'jev4[serving]' (tritonclient ships Triton's model_config protobuf)"
ENSEMBLE = "jev4"
MAX_LENGTH = 8192
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")
_NP_TO_TRITON = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}


@dataclass(frozen=True)
class TritonRepoSettings:
    """What ``jev4 triton-repo`` writes; checked before anything is read."""

    artifact: str
    out: str
    force: bool = False
    max_batch_size: int = 8
    instances: int = 1
    kind: str = "cpu"
    language_backend: str = "onnxruntime"
    queue_delay_us: int = 2000
    max_length: int = MAX_LENGTH

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "instances", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.kind not in KINDS:
            raise SettingsError(f"--kind {self.kind!r}: choose one of {KINDS}")
        if self.language_backend not in LANGUAGE_BACKENDS:
            raise SettingsError(f"--language-backend {self.language_backend!r}: choose one of {LANGUAGE_BACKENDS}")


def _schema() -> tuple[Any, Any, Any]:
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise MissingDependencyError(f"jev4 triton-repo validates configs against Triton's schema, which is not installed ({exc}); {INSTALL_HINT}") from None
    return model_config_pb2, json_format, text_format


def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False) -> dict[str, Any]:
    return {"name": name, "data_type": dtype, "dims": dims, **({"optional": True} if optional else {})}


def _instances(kind: str, count: int) -> list[dict[str, Any]]:
    return [{"kind": "KIND_GPU" if kind == "gpu" else "KIND_CPU", "count": count}]


def _params(values: dict[str, str]) -> dict[str, Any]:
    return {key: {"string_value": value} for key, value in values.items()}


def model_configs(settings: TritonRepoSettings, hidden: int, multi_dim: int, float_type: str, task: str, pad_id: int, dims: tuple[int, ...], with_trt: bool) -> dict[str, dict[str, Any]]:
    """Every model's config as Triton's JSON form of ``ModelConfig`` (batch axis implicit: ``max_batch_size`` > 0)."""
    batch = settings.max_batch_size
    dynamic = {"max_queue_delay_microseconds": settings.queue_delay_us}
    token_inputs = [
        _tensor("input_ids", "TYPE_INT64", [-1]),
        _tensor("attention_mask", "TYPE_INT64", [-1]),
        _tensor("position_ids", "TYPE_INT64", [3, -1]),
        _tensor("pooling_mask", "TYPE_INT64", [-1]),
    ]
    graph_outputs = [_tensor("single_vector", "TYPE_FP32", [hidden]), _tensor("multi_vector", "TYPE_FP32", [-1, multi_dim])]
    configs: dict[str, dict[str, Any]] = {
        "preprocess": {
            "name": "preprocess", "backend": "python", "max_batch_size": batch, "dynamic_batching": dynamic,
            "input": [_tensor("TEXT", "TYPE_STRING", [1]), _tensor("PROMPT_NAME", "TYPE_STRING", [1])],
            "output": token_inputs,
            "instance_group": _instances("cpu", settings.instances),
            "parameters": _params({
                "prefixes": json.dumps(PREFIXES), "query_only": "true" if task in QUERY_ONLY_TASKS else "false",
                "pad_token_id": str(pad_id), "max_length": str(settings.max_length), "task": task,
            }),
        },
        "language": {
            "name": "language", "max_batch_size": batch, "dynamic_batching": dynamic,
            "input": token_inputs, "output": graph_outputs,
            "instance_group": _instances(settings.kind, settings.instances),
            **({"backend": "python"} if settings.language_backend == "python" else {"platform": "onnxruntime_onnx", "backend": "onnxruntime", "default_model_filename": "model.onnx"}),
        },
        "pool": {
            "name": "pool", "backend": "python", "max_batch_size": batch, "dynamic_batching": dynamic,
            "input": [
                _tensor("single_vector", "TYPE_FP32", [hidden]), _tensor("multi_vector", "TYPE_FP32", [-1, multi_dim]),
                _tensor("attention_mask", "TYPE_INT64", [-1]), _tensor("TRUNCATE_DIM", "TYPE_INT32", [1]),
            ],
            "output": [_tensor("SINGLE", "TYPE_FP32", [-1]), _tensor("MULTI", "TYPE_FP32", [-1, multi_dim]), _tensor("LENGTHS", "TYPE_INT32", [1])],
            "instance_group": _instances("cpu", settings.instances),
            "parameters": _params({"hidden_size": str(hidden), "matryoshka_dims": ",".join(str(d) for d in dims)}),
        },
        ENSEMBLE: {
            "name": ENSEMBLE, "platform": "ensemble", "max_batch_size": batch,
            "input": [_tensor("TEXT", "TYPE_STRING", [1]), _tensor("PROMPT_NAME", "TYPE_STRING", [1]), _tensor("TRUNCATE_DIM", "TYPE_INT32", [1])],
            "output": [_tensor("SINGLE", "TYPE_FP32", [-1]), _tensor("MULTI", "TYPE_FP32", [-1, multi_dim]), _tensor("LENGTHS", "TYPE_INT32", [1])],
            "ensemble_scheduling": {"step": [
                {"model_name": "preprocess", "model_version": -1,
                 "input_map": {"TEXT": "TEXT", "PROMPT_NAME": "PROMPT_NAME"},
                 "output_map": {n: f"tok_{n}" for n in ("input_ids", "attention_mask", "position_ids", "pooling_mask")}},
                {"model_name": "language", "model_version": -1,
                 "input_map": {n: f"tok_{n}" for n in ("input_ids", "attention_mask", "position_ids", "pooling_mask")},
                 "output_map": {"single_vector": "graph_single", "multi_vector": "graph_multi"}},
                {"model_name": "pool", "model_version": -1,
                 "input_map": {"single_vector": "graph_single", "multi_vector": "graph_multi", "attention_mask": "tok_attention_mask", "TRUNCATE_DIM": "TRUNCATE_DIM"},
                 "output_map": {"SINGLE": "SINGLE", "MULTI": "MULTI", "LENGTHS": "LENGTHS"}},
            ]},
        },
    }  # fmt: skip
    if with_trt:  # the engine keeps the graph's own layout ([3, B, T] position ids): explicit shapes, no Triton batching
        trt_inputs = [_tensor("input_ids", "TYPE_INT64", [-1, -1]), _tensor("attention_mask", "TYPE_INT64", [-1, -1]),
                      _tensor("position_ids", "TYPE_INT64", [3, -1, -1]), _tensor("pooling_mask", "TYPE_INT64", [-1, -1])]  # fmt: skip
        configs["language_trt"] = {
            "name": "language_trt", "platform": "tensorrt_plan", "max_batch_size": 0, "default_model_filename": "language.plan",
            "input": trt_inputs + ([_tensor("image_embeds", float_type, [-1, hidden])] if float_type else []),
            "output": [_tensor("single_vector", "TYPE_FP32", [-1, hidden]), _tensor("multi_vector", "TYPE_FP32", [-1, -1, multi_dim])],
            "instance_group": _instances("gpu", settings.instances),
        }  # fmt: skip
    return configs


def to_pbtxt(config: dict[str, Any]) -> str:
    """Triton's text form, via its protobuf (an unknown field or enum value fails here, naming it)."""
    pb2, json_format, text_format = _schema()
    try:
        message = json_format.ParseDict(config, pb2.ModelConfig())
    except json_format.ParseError as exc:
        raise SettingsError(f"model {config.get('name')!r}: not a valid Triton ModelConfig ({exc})") from None
    return text_format.MessageToString(message)


def parse_pbtxt(path: Path) -> Any:
    """A written config.pbtxt parsed with Triton's schema (``text_format.Parse`` into ``ModelConfig``)."""
    pb2, _, text_format = _schema()
    try:
        return text_format.Parse(path.read_text(), pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ManifestError(f"{path}: not a valid Triton model config ({exc})") from None


def _rank(tensor: Any, batching: bool) -> int:
    return len(tensor.dims) + (1 if batching else 0)


def check_repository(root: Path) -> dict[str, Any]:
    """Parse every config.pbtxt under ``root`` and check the ensembles against their members; returns the parsed configs.

    Checked: each model's name matches its folder and has a version folder;
    each ensemble step names a model of the repository, maps only tensors that
    model has, and every ensemble tensor has one dtype and rank wherever it
    is produced or consumed (ensemble inputs/outputs included).
    """
    configs = {}
    for path in sorted(Path(root).glob("*/config.pbtxt")):
        config = parse_pbtxt(path)
        if config.name != path.parent.name:
            raise ManifestError(f"{path}: name {config.name!r} differs from its folder {path.parent.name!r}")
        if not (path.parent / "1").is_dir():
            raise ManifestError(f"{path.parent}: no version folder 1/")
        configs[config.name] = config
    problems = []
    for ensemble in (c for c in configs.values() if c.platform == "ensemble"):
        batching = ensemble.max_batch_size > 0
        seen: dict[str, tuple[int, int, str]] = {t.name: (t.data_type, _rank(t, batching), "ensemble input") for t in ensemble.input}
        wanted = {t.name: (t.data_type, _rank(t, batching), "ensemble output") for t in ensemble.output}
        for step in ensemble.ensemble_scheduling.step:
            member = configs.get(step.model_name)
            if member is None:
                problems.append(f"{ensemble.name}: step model {step.model_name!r} is not in the repository")
                continue
            if batching and member.max_batch_size < ensemble.max_batch_size:
                problems.append(f"{ensemble.name}: max_batch_size {ensemble.max_batch_size} > {member.name}'s {member.max_batch_size}")
            member_batching = member.max_batch_size > 0
            inputs = {t.name: t for t in member.input}
            outputs = {t.name: t for t in member.output}
            for model_tensor, ens_tensor in step.input_map.items():
                if model_tensor not in inputs:
                    problems.append(f"{ensemble.name} -> {member.name}: no input {model_tensor!r} (has {sorted(inputs)})")
                elif ens_tensor not in seen:
                    problems.append(f"{ensemble.name} -> {member.name}.{model_tensor}: {ens_tensor!r} is not produced before this step")
                else:
                    want = (inputs[model_tensor].data_type, _rank(inputs[model_tensor], member_batching))
                    if seen[ens_tensor][:2] != want:
                        problems.append(f"{ensemble.name}: {ens_tensor!r} from {seen[ens_tensor][2]} is {_describe(seen[ens_tensor][:2])}, {member.name}.{model_tensor} expects {_describe(want)}")
            required = {t.name for t in member.input if not t.optional}
            if required - set(step.input_map):
                problems.append(f"{ensemble.name} -> {member.name}: required inputs {sorted(required - set(step.input_map))} not mapped")
            for model_tensor, ens_tensor in step.output_map.items():
                if model_tensor not in outputs:
                    problems.append(f"{ensemble.name} -> {member.name}: no output {model_tensor!r} (has {sorted(outputs)})")
                    continue
                seen[ens_tensor] = (outputs[model_tensor].data_type, _rank(outputs[model_tensor], member_batching), f"{member.name}.{model_tensor}")
        for name, (dtype, rank, what) in wanted.items():
            if name not in seen:
                problems.append(f"{ensemble.name}: {what} {name!r} is produced by no step")
            elif seen[name][:2] != (dtype, rank):
                problems.append(f"{ensemble.name}: {what} {name!r} is {_describe((dtype, rank))}, produced as {_describe(seen[name][:2])} by {seen[name][2]}")
    if problems:
        raise ManifestError(f"{root}: inconsistent Triton model configs: " + "; ".join(problems))
    return configs


def _describe(value: tuple[int, int]) -> str:
    pb2, _, _ = _schema()
    return f"{pb2.DataType.Name(value[0])} rank {value[1]}"


def batch_first_language(source: Path, target: Path, hidden: int, float_dtype: str, with_images: bool) -> None:
    """``language.onnx`` with ``position_ids`` taken batch-first ([B, 3, T], transposed inside) and no ``image_embeds`` input.

    Triton batches along the first axis of every input; the exported graph
    takes position ids as [3, B, T] (M-RoPE sections first) and image token
    embeddings as [image_tokens, H]. Text requests carry no image tokens, so
    an empty constant stands in for ``image_embeds``. The weights stay in the
    artifact's external data file (``language.onnx.data``), copied beside.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    inner = "position_ids_sections_first"
    for node in graph.node:  # consumers now read the transposed tensor
        node.input[:] = [inner if name == "position_ids" else name for name in node.input]
    nodes = [helper.make_node("Transpose", ["position_ids"], [inner], perm=[1, 0, 2], name="jev4_triton_position_ids")]
    for index, tensor in enumerate(list(graph.input)):
        if tensor.name == "position_ids":
            graph.input.remove(tensor)
            graph.input.insert(index, helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", 3, "seq"]))
    if with_images:
        (embeds,) = [t for t in graph.input if t.name == "image_embeds"]
        graph.input.remove(embeds)
        empty = numpy_helper.from_array(np.zeros((0, hidden), dtype=np.dtype(float_dtype)), name="image_embeds_empty")
        nodes.append(helper.make_node("Constant", [], ["image_embeds"], value=empty, name="jev4_triton_no_images"))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.save(model, str(target))
    for data in source.parent.glob(source.name + ".data"):
        shutil.copy2(data, target.parent / data.name)  # a copy: onnx's checker refuses hard-linked external data
    onnx.checker.check_model(str(target))


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _model_code(name: str) -> str:
    return resources.files("jev4.export.triton_models").joinpath(name, "model.py").read_text()


def write_triton_repo(settings: TritonRepoSettings) -> Path:
    """Write the repository for ``settings.artifact`` to ``settings.out`` (atomically); see the module doc."""
    _schema()  # the schema is needed to validate: fail before any work
    root = Path(settings.artifact)
    manifest = verify_manifest(root)
    if manifest.get("kind") != "onnx":
        raise ManifestError(f"{root}: is a {manifest.get('kind')!r} artifact; jev4 triton-repo takes an ONNX artifact (jev4-export --format onnx)")
    contents = manifest["contents"]
    language = contents["graphs"]["language"]
    with_images = any(t["name"] == "image_embeds" for t in language["inputs"])
    config = load_config(root)
    from jev4.model.preprocess import load_tokenizer

    pad_id = int(load_tokenizer(root).pad_token_id)
    if not (root / "tokenizer.json").is_file():
        raise ManifestError(f"{root}: no tokenizer.json; the preprocess model needs it (re-export from a checkpoint that has one)")
    with_trt = (root / "language.plan").is_file()
    float_type = _NP_TO_TRITON[contents["float_dtype"]] if with_images else ""
    configs = model_configs(settings, config.hidden_size, config.multi_vector_dim, float_type, contents["task"], pad_id, config.matryoshka_dims, with_trt)
    with claim_output(settings.out, settings.force, (root,)):
        with atomic_output_dir(settings.out, force=settings.force) as tmp:
            for name, model in configs.items():
                (tmp / name / "1").mkdir(parents=True)
                (tmp / name / "config.pbtxt").write_text(to_pbtxt(model))
            for filename in TOKENIZER_FILES:
                if (root / filename).is_file():
                    shutil.copy2(root / filename, tmp / "preprocess" / "1" / filename)
            (tmp / "preprocess" / "1" / "model.py").write_text(_model_code("preprocess"))
            (tmp / "pool" / "1" / "model.py").write_text(_model_code("pool"))
            batch_first_language(root / language["file"], tmp / "language" / "1" / "model.onnx", config.hidden_size, contents["float_dtype"], with_images)
            if settings.language_backend == "python":
                (tmp / "language" / "1" / "model.py").write_text(_model_code("language_python"))
            if with_trt:
                _link_or_copy(root / "language.plan", tmp / "language_trt" / "1" / "language.plan")
            (tmp / ENSEMBLE / "1" / ".keep").write_text("")  # Triton wants a version folder, even for an ensemble
            check_repository(tmp)
            write_manifest(
                tmp,
                Manifest(
                    kind="triton-repo",
                    source=str(root),
                    settings=asdict(settings),
                    contents={"task": contents["task"], "models": sorted(configs), "ensemble": ENSEMBLE, "source_manifest_sha256": _sha(root / MANIFEST_NAME)},
                ),
            )
    log.info("Triton model repository for %s written to %s (models %s)", root, settings.out, sorted(configs))
    return Path(settings.out)


def _sha(path: Path) -> str:
    from jev4.export.manifest import sha256_file

    return sha256_file(path)
