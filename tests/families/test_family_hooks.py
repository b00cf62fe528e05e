"""A family's hooks: jev4-export, jev4.runtime.load and jev4 validate hand its checkpoints to its own code.

A third family is registered here the way a real one would be (one
``Family`` entry whose hooks name a module), with a room that records what
it was given, so the tests show that the shared commands need nothing else.
"""

import json
import re
import sys
import types
from dataclasses import dataclass

import pytest

from jev4.cli.export import main as export_main
from jev4.cli.main import main as jev4_main
from jev4.errors import SettingsError
from jev4.families import registry
from jev4.families.registry import Family, family_named, local_family
from jev4.runtime import load
from jev4.runtime.loader import LoadRequest

ROOM = "jev4_test_toy_room"


@dataclass
class ToyCheck:
    name: str
    ok: bool

    def describe(self) -> str:
        return f"{self.name}: {'ok' if self.ok else 'too far'}"


@dataclass
class ToyReport:
    checks: list
    passed: bool

    @property
    def failures(self):
        return [c for c in self.checks if not c.ok]


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A 'toy' family (model_type toy_model) in the registry, its room a module that records every call."""
    calls = []
    room = types.ModuleType(ROOM)

    def export(args):
        calls.append(("export", args.model, args.out))
        return args.out

    def load_(root, request):
        calls.append(("load", root, request))
        return {"toy encoder for": root}

    def validate(args):
        calls.append(("validate", args.reference, args.artifact))
        return ToyReport([ToyCheck("cosine", True), ToyCheck("ndcg", args.artifact.endswith("good"))], args.artifact.endswith("good"))

    room.export, room.load, room.validate = export, load_, validate
    monkeypatch.setitem(sys.modules, ROOM, room)
    family = Family("toy", ("toy_model",), f"{ROOM}:load", f"{ROOM}:export", "a toy", exporter=f"{ROOM}:export", runtime_loader=f"{ROOM}:load", validator=f"{ROOM}:validate")
    monkeypatch.setattr(registry, "FAMILIES", (*registry.FAMILIES, family))
    model = tmp_path / "toy-ckpt"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "toy_model"}))
    return model, calls


def test_export_hands_a_family_checkpoint_to_its_exporter(toy, tmp_path, capsys):
    model, calls = toy
    out = tmp_path / "art"
    assert export_main(["--model", str(model), "--out", str(out)]) == 0
    assert calls == [("export", str(model), str(out))]
    assert capsys.readouterr().out.strip() == str(out)


def test_load_hands_a_family_directory_to_its_loader_with_the_request(toy):
    model, calls = toy
    encoder = load(model, backend="onnxruntime", threads=2, task="retrieval")
    assert encoder == {"toy encoder for": model}
    (name, root, request), = calls
    assert name == "load" and root == model
    assert request == LoadRequest(backend="onnxruntime", provider="cpu", device="cpu", dtype="fp32", verify=True, threads=2, v4_only=("task",))


def test_validate_hands_a_family_reference_to_its_validator(toy, tmp_path, capsys):
    model, calls = toy
    out = tmp_path / "report"
    assert jev4_main(["validate", "--reference", str(model), "--artifact", "art-good", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "verdict: PASS (2/2 checks passed)"
    assert jev4_main(["validate", "--reference", str(model), "--artifact", "art-bad", "--out", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["verdict: FAIL (1/2 checks passed)", "  failed: ndcg: too far"]
    assert [c[0] for c in calls] == ["validate", "validate"]


def test_local_family_is_none_for_the_built_in_path(toy, tiny_dir, tmp_path):
    model, _ = toy
    assert local_family(model).name == "toy"
    assert local_family(str(model)).name == "toy"
    assert local_family(tiny_dir) is None  # jina-embeddings-v4: registered, but its path is the built-in one
    assert local_family("jinaai/jina-embeddings-v4") is None  # a hub id
    assert local_family(tmp_path / "missing") is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert local_family(broken) is None  # the built-in path names the problem
    (broken / "config.json").write_text(json.dumps({"model_type": "qwen2"}))  # v4's own text-only export
    assert local_family(broken) is None


def test_clip_v2_hooks_resolve_to_its_room():
    from jev4.families.jina_clip_v2 import commands, loading

    clip = family_named("jina-clip-v2")
    assert registry._resolve(clip.exporter) is commands.export
    assert registry._resolve(clip.validator) is commands.validate
    assert registry._resolve(clip.runtime_loader) is loading.load
    v4 = family_named("jina-embeddings-v4")
    assert (v4.exporter, v4.runtime_loader, v4.validator) == ("", "", "")


def test_a_missing_hook_is_named(tmp_path):
    v4 = family_named("jina-embeddings-v4")
    with pytest.raises(SettingsError, match=re.escape("family 'jina-embeddings-v4' has no exporter: its checkpoints take jev4's built-in path")):
        v4.export(None)
    with pytest.raises(SettingsError, match=re.escape("family 'jina-embeddings-v4' has no runtime_loader")):
        v4.load_runtime(tmp_path, None)
    with pytest.raises(SettingsError, match=re.escape("family 'x': validator 'pkg.validate' must read 'module:attribute'")):
        Family("x", ("x",), "a:b", "a:b", "d", validator="pkg.validate")
