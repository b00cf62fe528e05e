"""config.json parsing: jina's extras validated with the offending key named."""

import copy
import json

import pytest

from jev4.errors import ConfigError, EncodeError, TaskError
from jev4.model.config import load_config, parse_config


@pytest.fixture(scope="module")
def raw(tiny_dir):
    return json.loads((tiny_dir / "config.json").read_text())


def test_tiny_config(tiny_dir):
    cfg = load_config(tiny_dir)
    assert cfg.task_names == ("retrieval", "text-matching", "code")
    assert cfg.matryoshka_dims == (8, 16, 32) and cfg.hidden_size == 64 and cfg.multi_vector_dim == 32
    assert cfg.merged_task is None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(truncate_dim=12), "truncate_dim 12"),
        (lambda r: r["rope_scaling"].update(mrope_section=[2, 2, 2]), "mrope_section"),
        (lambda r: r.update(single_vector_pool_strategy="cls"), "single_vector_pool_strategy"),
        (lambda r: r.update(task_names=["code", "code"]), "duplicates"),
        (lambda r: r.update(num_attention_heads=5), "num_attention_heads"),
        (lambda r: r.update(matryoshka_dims=[8, 999]), "matryoshka_dims"),
        (lambda r: r.pop("vision_config"), "vision_config"),
    ],
)
def test_bad_config(raw, edit, message):
    bad = copy.deepcopy(raw)
    edit(bad)
    with pytest.raises(ConfigError, match=message):
        parse_config(bad)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


def test_both_rope_spellings_agree(raw):
    old = parse_config(raw).to_transformers()
    new_raw = copy.deepcopy(raw)
    new_raw["rope_scaling"] = {"rope_type": "default", "mrope_section": [2, 3, 3]}
    new_raw["text_config"]["rope_scaling"] = new_raw["rope_scaling"]
    new = parse_config(new_raw).to_transformers()
    assert old.text_config.rope_parameters == new.text_config.rope_parameters
    assert old.text_config.rope_parameters["mrope_section"] == [2, 3, 3]


def test_checks(tiny_dir):
    cfg = load_config(tiny_dir)
    for dim in cfg.matryoshka_dims:
        assert cfg.check_truncate_dim(dim) == dim
    assert cfg.check_truncate_dim(64) is None
    with pytest.raises(EncodeError, match="truncate_dim=10"):
        cfg.check_truncate_dim(10)
    with pytest.raises(TaskError, match=r"'qa'.*\['retrieval', 'text-matching', 'code'\]"):
        cfg.check_task("qa")
