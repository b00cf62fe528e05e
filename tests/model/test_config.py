"""config.json parsing: jina's extras validated with the offending key named."""

import copy
import json

import pytest

from jev4.errors import ConfigError, EncodeError, TaskError
from jev4.model.config import load_config, parse_config

TASKS = ("retrieval", "text-matching", "code")


@pytest.fixture(scope="module")
def raw(tiny_dir):
    return json.loads((tiny_dir / "config.json").read_text())


def _edited(raw, edit):
    bad = copy.deepcopy(raw)
    edit(bad)
    return bad


def test_tiny_config_parses(tiny_dir, raw):
    cfg = load_config(tiny_dir)
    assert cfg.task_names == TASKS
    assert cfg.hidden_size == 64 and cfg.num_hidden_layers == 2 and cfg.multi_vector_dim == 32
    # the full size (64) is listed in the file but is "no truncation", not a Matryoshka dim
    assert raw["matryoshka_dims"] == [8, 16, 32, 64]
    assert cfg.matryoshka_dims == (8, 16, 32)
    assert cfg.truncate_dim is None and cfg.merged_task is None
    assert cfg.torch_dtype == "bfloat16"
    special = cfg.special_tokens
    assert special.image_token_id == raw["image_token_id"]
    assert special.video_token_id == raw["video_token_id"]
    assert special.vision_start_token_id == raw["vision_start_token_id"]
    assert special.vision_end_token_id == raw["vision_end_token_id"]
    assert len({special.image_token_id, special.video_token_id, special.vision_start_token_id, special.vision_end_token_id}) == 4
    assert cfg.vision_config["spatial_merge_size"] == 2 and cfg.vision_config["out_hidden_size"] == 64


def test_to_transformers_carries_the_sizes(raw):
    qwen = parse_config(raw).to_transformers()
    text, vision = qwen.text_config, qwen.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (64, 2, 4, 2)
    assert text.intermediate_size == 128 and text.vocab_size == raw["vocab_size"]
    assert text.rope_parameters["mrope_section"] == [2, 3, 3]
    assert text.rope_parameters["rope_theta"] == raw["rope_theta"]
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (4, 32, 64)
    assert list(vision.fullatt_block_indexes) == [1, 3]
    assert qwen.image_token_id == raw["image_token_id"]
    assert qwen.vision_start_token_id == raw["vision_start_token_id"]
    assert qwen.vision_end_token_id == raw["vision_end_token_id"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(truncate_dim=12), r"truncate_dim 12 is not one of matryoshka_dims"),
        (lambda r: r["rope_scaling"].update(mrope_section=[2, 2, 2]), r"mrope_section \[2, 2, 2\] sums to 6, expected head_dim/2 = 8"),
        (lambda r: r["rope_scaling"].update(mrope_section=[4, 4]), r"mrope_section must be three integers"),
        (lambda r: r.update(single_vector_pool_strategy="cls"), r"single_vector_pool_strategy 'cls' is not supported"),
        (lambda r: r.update(task_names=["code", "retrieval", "code"]), r"task_names has duplicates"),
        (lambda r: r.update(task_names=[]), r"task_names must be a non-empty list"),
        (lambda r: r.update(num_attention_heads=5), r"num_attention_heads"),
        (lambda r: r.update(hidden_size=0), r"hidden_size must be a positive integer"),
        (lambda r: r.update(matryoshka_dims=[8, 999]), r"matryoshka_dims"),
        (lambda r: r.update(multi_vector_projector_dim="128"), r"multi_vector_projector_dim"),
        (lambda r: r.pop("vision_config"), r"vision_config is missing"),
        (lambda r: r["vision_config"].update(out_hidden_size=32), r"out_hidden_size 32 != hidden_size 64"),
        (lambda r: r.update(image_token_id="x"), r"image_token_id must be an integer"),
    ],
    ids=[
        "truncate-dim",
        "mrope-sum",
        "mrope-len",
        "pooling",
        "duplicate-tasks",
        "no-tasks",
        "heads",
        "hidden",
        "matryoshka",
        "mv-dim",
        "no-vision",
        "vision-out",
        "token-id",
    ],
)
def test_bad_config_names_the_key(raw, edit, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(_edited(raw, edit), source="somewhere/config.json")
    # the source is named too
    with pytest.raises(ConfigError, match="^somewhere/config.json: "):
        parse_config(_edited(raw, edit), source="somewhere/config.json")


def test_missing_hidden_size_in_both_places(raw):
    def drop(r):
        r.pop("hidden_size")
        r["text_config"].pop("hidden_size")

    with pytest.raises(ConfigError, match="hidden_size must be a positive integer, got None"):
        parse_config(_edited(raw, drop))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}: not found"):
        load_config(tmp_path)


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}: not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}: not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        load_config(tmp_path)


def test_errors_from_file_name_the_path(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(_edited(raw, lambda r: r.update(truncate_dim=7))))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}: truncate_dim 7"):
        load_config(tmp_path)


def test_truncate_dim_from_config(raw):
    assert parse_config(_edited(raw, lambda r: r.update(truncate_dim=16))).truncate_dim == 16
    # the full size means no truncation
    assert parse_config(_edited(raw, lambda r: r.update(truncate_dim=64))).truncate_dim is None


def _new_spelling(r, where=("top", "text")):
    spelled = {"rope_type": "default", "mrope_section": [2, 3, 3]}
    if "top" in where:
        r["rope_scaling"] = dict(spelled)
    if "text" in where:
        r["text_config"]["rope_scaling"] = dict(spelled)


@pytest.mark.parametrize("where", [("top", "text"), ("top",), ("text",)], ids=["both", "top-only", "text-config-only"])
def test_both_rope_spellings_give_the_same_transformers_config(raw, where):
    assert raw["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    old = parse_config(raw).to_transformers()
    new_raw = _edited(raw, lambda r: _new_spelling(r, where))
    if where == ("text",):
        new_raw.pop("rope_scaling")
    new = parse_config(new_raw).to_transformers()
    assert old.to_dict() == new.to_dict()
    assert new.text_config.rope_parameters == {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0}


def test_rope_theta_reaches_transformers(raw):
    def edit(r):
        r["rope_theta"] = 5000.0
        r["text_config"]["rope_theta"] = 5000.0

    qwen = parse_config(_edited(raw, edit)).to_transformers()
    assert qwen.text_config.rope_parameters["rope_theta"] == 5000.0


def test_jina_keys_do_not_leak_into_transformers(raw):
    qwen = parse_config(raw).to_transformers().to_dict()
    for key in ("task_names", "matryoshka_dims", "truncate_dim", "multi_vector_projector_dim", "single_vector_pool_strategy"):
        assert key not in qwen
        assert key not in qwen["text_config"]


def test_check_truncate_dim(tiny_dir):
    cfg = load_config(tiny_dir)
    for dim in cfg.matryoshka_dims:
        assert cfg.check_truncate_dim(dim) == dim
    assert cfg.check_truncate_dim(None) is None
    assert cfg.check_truncate_dim(cfg.hidden_size) is None
    for bad in (1, 10, 63, 128, 2048):
        with pytest.raises(EncodeError, match=rf"truncate_dim={bad} is not allowed; choose one of \[8, 16, 32\] or 64"):
            cfg.check_truncate_dim(bad)


def test_check_task(tiny_dir):
    cfg = load_config(tiny_dir)
    for task in TASKS:
        assert cfg.check_task(task) == task
    with pytest.raises(TaskError, match=r"unknown task 'qa'; this checkpoint has \['retrieval', 'text-matching', 'code'\]"):
        cfg.check_task("qa")
    with pytest.raises(TaskError, match="retrieval"):
        cfg.check_task("Retrieval")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(text_config=[1]), r"text_config must be a JSON object, got list$"),
        (lambda r: r.update(vision_config="x"), r"vision_config must be a JSON object, got str$"),
        (lambda r: r.update(rope_scaling=[1]), r"rope_scaling must be a JSON object, got list$"),
        (lambda r: r["text_config"].update(rope_scaling="x"), r"text_config.rope_scaling must be a JSON object, got str$"),
        (lambda r: r["text_config"].update(rope_parameters=7), r"text_config.rope_parameters must be a JSON object, got int$"),
    ],
    ids=["text-config-list", "vision-config-str", "rope-scaling-list", "text-rope-scaling-str", "text-rope-parameters-int"],
)
def test_nested_sections_must_be_objects(raw, edit, message):
    with pytest.raises(ConfigError, match=r"^somewhere/config.json: " + message):
        parse_config(_edited(raw, edit), source="somewhere/config.json")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(vocab_size=3), r"pad_token_id 582 is outside the vocabulary: token ids must be in 0\.\.2 \(vocab_size 3\)"),
        (lambda r: r.update(pad_token_id=1000000000), r"pad_token_id 1000000000 is outside the vocabulary: token ids must be in 0\.\.639 \(vocab_size 640\)"),
        (lambda r: r.update(bos_token_id=-1), r"bos_token_id -1 is outside the vocabulary"),
        (lambda r: r.update(eos_token_id=[584, 640]), r"eos_token_id 640 is outside the vocabulary"),
        (lambda r: r.update(image_token_id=640), r"image_token_id 640 is outside the vocabulary: token ids must be in 0\.\.639 \(vocab_size 640\)"),
        (lambda r: r.update(vision_end_token_id=10**9), r"vision_end_token_id 1000000000 is outside the vocabulary"),
        (lambda r: r.update(vision_token_id=700), r"vision_token_id 700 is outside the vocabulary"),
        (lambda r: r.pop("video_token_id"), r"video_token_id 151656 \(the default; the file does not set it\) is outside the vocabulary"),
    ],
    ids=["vocab-3", "pad-huge", "bos-negative", "eos-list", "image", "vision-end", "vision-token", "default-video"],
)
def test_token_ids_must_fit_the_vocabulary(raw, edit, message):
    assert raw["vocab_size"] == 640
    with pytest.raises(ConfigError, match=r"^somewhere/config.json: " + message):
        parse_config(_edited(raw, edit), source="somewhere/config.json")


def test_null_and_list_token_ids_are_allowed(raw):
    cfg = parse_config(_edited(raw, lambda r: r.update(pad_token_id=None, eos_token_id=[584, 582])))
    cfg.to_transformers()


@pytest.mark.parametrize(
    "key, value, where",
    [
        ("rms_norm_eps", -1, "top"),
        ("rms_norm_eps", -1.0, "top"),
        ("rms_norm_eps", 0, "top"),
        ("rms_norm_eps", float("nan"), "top"),
        ("rope_theta", 0, "top"),
        ("rope_theta", -10000.0, "top"),
        ("rope_theta", float("inf"), "top"),
        ("rope_theta", "1e6", "top"),
        ("rope_theta", 0, "rope_scaling"),
        ("rms_norm_eps", -1e-6, "text_config"),
    ],
)
def test_norm_eps_and_rope_theta_must_be_positive_finite(raw, key, value, where):
    def edit(r):
        if where == "top":
            r[key] = value
        elif where == "rope_scaling":
            r["rope_scaling"][key] = value
        else:
            r.pop(key)
            r["text_config"][key] = value

    prefix = "rope_scaling." if where == "rope_scaling" else ""
    with pytest.raises(ConfigError, match=rf"^somewhere/config.json: {prefix}{key} must be a positive finite number, got {value!r}$"):
        parse_config(_edited(raw, edit), source="somewhere/config.json")


def test_transformers_refusal_is_a_config_error_naming_the_file(raw):
    cfg = parse_config(_edited(raw, lambda r: r.update(sliding_window="x")), source="somewhere/config.json")
    with pytest.raises(ConfigError, match=r"^somewhere/config.json: transformers' Qwen2_5_VLConfig refused these settings \(.*sliding_window") as info:
        cfg.to_transformers()
    assert "\n" not in str(info.value)


def test_load_config_names_the_path_in_to_transformers(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(_edited(raw, lambda r: r["vision_config"].update(depth="x"))))
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'config.json'}: transformers' .*depth"):
        load_config(tmp_path).to_transformers()
