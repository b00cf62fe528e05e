"""Quantization recipes: presets, validation, exclusion patterns, JSON round trip, module selection."""

import json

import pytest

from jev4.quant.recipes import DEFAULT_EXCLUDE, RECIPE_VERSION, QuantRecipe, RecipeError, make_recipe
from jev4.quant.weights import QuantizationError, select_linears


def test_presets():
    fp8 = make_recipe("fp8")
    assert (fp8.precision, fp8.weight_granularity, fp8.activation_granularity) == ("fp8", "per-tensor", "per-tensor")
    assert fp8.smoothquant_alpha is None and fp8.qmax == 448.0 and fp8.onnx_type == "FLOAT8E4M3FN"
    int8 = make_recipe("int8")
    assert (int8.precision, int8.weight_granularity, int8.smoothquant_alpha) == ("int8", "per-channel", 0.5)
    assert int8.qmax == 127.0 and int8.onnx_type == "INT8"
    assert make_recipe("fp8", "per-channel").weight_granularity == "per-channel"
    assert make_recipe("int8", smoothquant_alpha=None).smoothquant_alpha is None
    assert fp8.exclude == DEFAULT_EXCLUDE == int8.exclude


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(precision="fp4", weight_granularity="per-tensor"), "unknown quantization precision"),
        (dict(precision="fp8", weight_granularity="per-row"), "weight granularity"),
        (dict(precision="fp8", weight_granularity="per-tensor", activation_granularity="per-token"), "only per-tensor"),
        (dict(precision="fp8", weight_granularity="per-tensor", calibration="entropy"), "calibration"),
        (dict(precision="fp8", weight_granularity="per-tensor", smoothquant_alpha=0.5), "int8 recipes only"),
        (dict(precision="int8", weight_granularity="per-channel", smoothquant_alpha=1.5), r"\[0, 1\]"),
        (dict(precision="int8", weight_granularity="per-channel", smoothquant_alpha=True), r"\[0, 1\]"),
        (dict(precision="int8", weight_granularity="per-channel", exclude="*norm*"), "sequence of non-empty patterns"),
        (dict(precision="int8", weight_granularity="per-channel", exclude=("",)), "sequence of non-empty patterns"),
        (dict(precision="int8", weight_granularity="per-channel", version=RECIPE_VERSION + 1), "version"),
    ],
)
def test_invalid_recipes_are_refused(kwargs, message):
    with pytest.raises(RecipeError, match=message):
        QuantRecipe(**kwargs)


def test_recipe_is_frozen():
    recipe = make_recipe("fp8")
    with pytest.raises(AttributeError):
        recipe.precision = "int8"


def test_default_exclusions():
    recipe = make_recipe("fp8")
    assert recipe.excluded_by("model.language_model.layers.0.self_attn.q_proj", last_vision_block=31) is None
    assert recipe.excluded_by("model.language_model.layers.35.mlp.down_proj", last_vision_block=31) is None
    assert recipe.excluded_by("multi_vector_projector", 31) == "multi_vector_projector"
    assert recipe.excluded_by("lm_head", 31) == "lm_head"
    assert recipe.excluded_by("model.language_model.embed_tokens", 31) == "*embed_tokens*"
    assert recipe.excluded_by("model.language_model.layers.0.input_layernorm", 31) == "*norm*"
    assert recipe.excluded_by("model.visual.blocks.0.attn.qkv", 31) == "model.visual.*"


def test_removing_the_tower_exclusion_keeps_the_overflowing_layers():
    recipe = make_recipe("fp8", exclude=["!model.visual.*"])
    assert "model.visual.*" not in recipe.exclude
    assert recipe.excluded_by("model.visual.blocks.0.attn.qkv", last_vision_block=31) is None
    assert recipe.excluded_by("model.visual.blocks.30.mlp.down_proj", 31) is None
    # {last} is the last block of *this* tower: 31 in the 3B model
    assert recipe.excluded_by("model.visual.blocks.31.mlp.down_proj", 31) == "model.visual.blocks.{last}.mlp.down_proj"
    assert recipe.excluded_by("model.visual.blocks.3.mlp.down_proj", 3) == "model.visual.blocks.{last}.mlp.down_proj"
    assert recipe.excluded_by("model.visual.merger.mlp.0", 31) == "model.visual.merger*"
    # without a vision tower, {last} patterns match nothing (and do not crash)
    assert recipe.excluded_by("model.visual.blocks.3.mlp.down_proj", None) is None


def test_user_patterns_add_and_remove():
    recipe = make_recipe("int8", exclude=["*.mlp.down_proj", "!multi_vector_projector", "*.mlp.down_proj"])
    assert recipe.exclude.count("*.mlp.down_proj") == 1
    assert recipe.excluded_by("model.language_model.layers.2.mlp.down_proj") == "*.mlp.down_proj"
    assert recipe.excluded_by("multi_vector_projector") is None
    with pytest.raises(RecipeError, match="not an exclusion to remove"):
        make_recipe("fp8", exclude=["!*.q_proj"])
    with pytest.raises(RecipeError, match="empty pattern"):
        make_recipe("fp8", exclude=["!"])


def test_json_round_trip():
    recipe = make_recipe("int8", "per-tensor", exclude=["*.o_proj"], smoothquant_alpha=0.8)
    data = json.loads(json.dumps(recipe.to_json()))
    assert data["kind"] == "jev4-quant-recipe" and data["version"] == RECIPE_VERSION
    assert QuantRecipe.from_json(data) == recipe
    with pytest.raises(RecipeError, match="not a jev4 quantization recipe"):
        QuantRecipe.from_json({"precision": "fp8"})
    with pytest.raises(RecipeError, match="unknown recipe key"):
        QuantRecipe.from_json({**data, "group_size": 128})


@pytest.fixture(scope="module")
def meta_network(tiny_dir):
    from jev4.model.config import load_config
    from jev4.model.network import build_meta_network

    return build_meta_network(load_config(tiny_dir))


def test_select_linears_on_the_tiny_network(meta_network):
    quantized, excluded = select_linears(meta_network, make_recipe("fp8"))
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert sorted(quantized) == sorted(f"model.language_model.layers.{i}.{p}" for i in range(2) for p in per_layer)
    assert excluded["multi_vector_projector"] == "multi_vector_projector"
    vision = [n for n in excluded if n.startswith("model.visual.")]
    assert vision and all(excluded[n] == "model.visual.*" for n in vision)

    # The tower un-excluded: its Linears are quantized, except the last block's down_proj and the merger.
    quantized, excluded = select_linears(meta_network, make_recipe("fp8", exclude=["!model.visual.*"]))
    assert "model.visual.blocks.0.attn.qkv" in quantized and "model.visual.blocks.2.mlp.down_proj" in quantized
    assert excluded["model.visual.blocks.3.mlp.down_proj"] == "model.visual.blocks.{last}.mlp.down_proj"
    assert {n for n in excluded if n.startswith("model.visual.merger")} and all(
        excluded[n] == "model.visual.merger*" for n in excluded if n.startswith("model.visual.merger")
    )


def test_excluding_everything_is_an_error(meta_network):
    with pytest.raises(QuantizationError, match="leave no Linear"):
        select_linears(meta_network, make_recipe("fp8", exclude=["model.*"]))
