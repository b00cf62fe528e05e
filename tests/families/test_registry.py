"""The family registry (config.json's model_type -> family) and ``jev4 make-tiny --family``."""

import json
import re

import pytest
from safetensors import safe_open

from jev4.cli.main import main as jev4_main
from jev4.errors import ConfigError, SettingsError
from jev4.families import registry
from jev4.families.jina_clip_v2 import MODEL_TYPE as CLIP_MODEL_TYPE
from jev4.families.jina_clip_v2.encoder import ClipV2Encoder
from jev4.families.jina_clip_v2.tiny import write_tiny_checkpoint as write_clip_tiny
from jev4.families.registry import FAMILIES, Family, family_named, family_names, family_of

V4, CLIP = "jina-embeddings-v4", "jina-clip-v2"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_clip_tiny(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=0)


def _with_config(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
    return tmp_path


def _base_keys(model_dir):
    keys = set()
    for shard in sorted(model_dir.glob("model*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            keys |= set(f.keys())
    return keys


# --------------------------------------------------------------------------- recognition


def test_both_v4_key_layouts_are_jina_embeddings_v4(tiny_dir, tiny_dir_new):
    old, new = _base_keys(tiny_dir), _base_keys(tiny_dir_new)
    assert any(k.startswith("model.layers.") for k in old) and any(k.startswith("model.language_model.") for k in new)
    assert family_of(tiny_dir).name == V4
    assert family_of(tiny_dir_new).name == V4
    assert family_of(str(tiny_dir)) is family_named(V4)


def test_tiny_clip_is_jina_clip_v2(clip_dir):
    family = family_of(clip_dir)
    assert family.name == CLIP
    assert family.model_types == (CLIP_MODEL_TYPE,) == ("jina_clip",)  # the room's constant, not a second spelling


def test_loaders_resolve_to_each_family_own_code():
    v4, clip = family_named(V4), family_named(CLIP)
    from jev4.model.encoder import TorchEncoder

    assert registry._resolve(v4.reference) == TorchEncoder.from_pretrained
    assert registry._resolve(clip.reference) == ClipV2Encoder.from_pretrained
    assert registry._resolve(clip.tiny_writer) is write_clip_tiny
    assert registry._resolve(v4.tiny_writer) is registry.write_v4_tiny
    for family in FAMILIES:
        assert family.description and callable(registry._resolve(family.reference)) and callable(registry._resolve(family.tiny_writer))


def test_model_types_are_unique_across_families():
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types))
    assert family_names() == (V4, CLIP)  # the first is make-tiny's default


def test_load_reference_through_the_family(clip_dir):
    enc = family_of(clip_dir).load_reference(clip_dir)
    assert isinstance(enc, ClipV2Encoder)
    assert tuple(enc.encode_text(["hello"], prompt_name="query").shape) == (1, 32)


# --------------------------------------------------------------------------- errors


def test_unknown_model_type_is_named_with_the_known_ones(tmp_path):
    d = _with_config(tmp_path, {"model_type": "bert"})
    with pytest.raises(ConfigError) as err:
        family_of(d)
    assert str(err.value) == (
        f"{d / 'config.json'}: unknown model_type 'bert'; known model_type values: "
        "'qwen2_5_vl' (jina-embeddings-v4), 'jina_clip' (jina-clip-v2)"
    )
    assert "\n" not in str(err.value)


def test_missing_model_type_is_named(tmp_path):
    d = _with_config(tmp_path, {"architectures": ["X"]})
    with pytest.raises(ConfigError, match=re.escape(f"{d / 'config.json'}: no model_type, so its model family is unknown; known model_type values: 'qwen2_5_vl'")):
        family_of(d)


def test_model_type_not_a_string(tmp_path):
    d = _with_config(tmp_path, {"model_type": 3})
    with pytest.raises(ConfigError, match=re.escape(f"{d / 'config.json'}: model_type must be a string, got int")):
        family_of(d)


def test_missing_or_broken_config(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'config.json'}: not found (is {tmp_path} a model checkpoint?)")):
        family_of(tmp_path)
    _with_config(tmp_path, "[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        family_of(tmp_path)
    _with_config(tmp_path, "{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        family_of(tmp_path)


def test_unknown_family_name():
    with pytest.raises(SettingsError, match=re.escape("unknown model family 'clip'; known: jina-embeddings-v4, jina-clip-v2")):
        family_named("clip")


def test_family_checks_its_own_fields():
    with pytest.raises(SettingsError, match="model_types is empty"):
        Family("x", (), "a:b", "a:b", "d")
    with pytest.raises(SettingsError, match=re.escape("family 'x': reference 'a.b' must read 'module:attribute'")):
        Family("x", ("x",), "a.b", "a:b", "d")


def test_write_tiny_refuses_options_of_other_families(tmp_path):
    with pytest.raises(SettingsError, match=re.escape("jina-clip-v2 tiny checkpoint: unknown option(s) layout (it takes: none)")):
        family_named(CLIP).write_tiny(tmp_path / "x", layout="new")
    assert not (tmp_path / "x").exists()
    with pytest.raises(SettingsError, match=re.escape("head_dim 8: the jina-embeddings-v4 tiny checkpoint has head sizes [16, 32]")):
        family_named(V4).write_tiny(tmp_path / "y", head_dim=8)


# --------------------------------------------------------------------------- jev4 make-tiny --family


def test_make_tiny_default_is_v4_unchanged(tmp_path, tiny_dir):
    out = tmp_path / "v4"
    assert jev4_main(["make-tiny", str(out)]) == 0
    assert family_of(out).name == V4
    assert _base_keys(out) == _base_keys(tiny_dir)  # seed 0, old layout, head dim 16: the session fixture's layout
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_dir / "config.json").read_text())


def test_make_tiny_v4_options(tmp_path, tiny_dir_new):
    out = tmp_path / "v4-new"
    assert jev4_main(["make-tiny", str(out), "--family", V4, "--layout", "new", "--head-dim", "32"]) == 0
    assert _base_keys(out) == _base_keys(tiny_dir_new)
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 32


def test_make_tiny_clip(tmp_path, clip_dir, capsys):
    out = tmp_path / "clip"
    assert jev4_main(["make-tiny", str(out), "--family", CLIP]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert family_of(out).name == CLIP
    assert (out / "model.safetensors").read_bytes() == (clip_dir / "model.safetensors").read_bytes()  # seed 0 both
    assert jev4_main(["make-tiny", str(out), "--family", CLIP]) == 2  # exists, no --force
    assert jev4_main(["make-tiny", str(out), "--family", CLIP, "--seed", "1", "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() != (clip_dir / "model.safetensors").read_bytes()


@pytest.mark.parametrize("flag", [["--layout", "old"], ["--head-dim", "16"]])
def test_make_tiny_v4_flags_refused_for_clip(tmp_path, caplog, flag):
    out = tmp_path / "clip"
    assert jev4_main(["make-tiny", str(out), "--family", CLIP, *flag]) == 2
    assert f"make-tiny {flag[0]}: applies only to jina-embeddings-v4, not to --family jina-clip-v2" in caplog.text
    assert not out.exists()


def test_make_tiny_unknown_family(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        jev4_main(["make-tiny", str(tmp_path / "x"), "--family", "jina-clip"])
    assert exc.value.code == 2
    assert "invalid choice: 'jina-clip'" in capsys.readouterr().err
