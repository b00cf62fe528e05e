"""Calibration data (built-in, text and JSONL files) and the per-Linear activation statistics."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from jev4.quant.calibration import CalibrationError, builtin_items, calibration_items, collect_input_absmax, load_calibration_file, make_forward_loop


def test_builtin_set_texts_only_and_with_images():
    texts = builtin_items(20, with_images=False)
    assert len(texts.items) == 20 and texts.images == 0 and texts.source == "builtin:stdlib-code"
    assert all(isinstance(t, str) and t.strip() for t in texts.items)
    # docstring summaries and function sources alternate
    assert any(t.startswith("def ") for t in texts.items) and any(not t.startswith(("def ", "async def ")) for t in texts.items)
    mixed = builtin_items(24, with_images=True)
    assert len(mixed.items) == 24 and mixed.images == 3 and mixed.texts == 21
    assert mixed.source == "builtin:stdlib-code+pydoc-pages"
    assert all(isinstance(i, Image.Image) for i in mixed.items if not isinstance(i, str))
    assert builtin_items(20, with_images=False).items == texts.items  # deterministic
    assert mixed.describe() == {"source": "builtin:stdlib-code+pydoc-pages", "samples": 24, "texts": 21, "images": 3}


def test_text_file_one_sample_per_line(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("first line\n\n  \nsecond line\nthird\n", encoding="utf-8")
    assert load_calibration_file(path) == ["first line", "second line", "third"]
    chosen = calibration_items(path, 2, with_images=False)
    assert chosen.items == ("first line", "second line") and chosen.source == f"file:{path}"


def test_jsonl_texts_and_images(tmp_path):
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "page.png")
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join([json.dumps({"text": "a query"}), "", json.dumps({"image": "page.png"}), json.dumps({"text": "a passage"})]) + "\n")
    items = load_calibration_file(path)
    assert items[0] == "a query" and items[2] == "a passage"
    assert isinstance(items[1], Image.Image) and items[1].size == (64, 48) and items[1].mode == "RGB"
    with pytest.raises(CalibrationError, match="no vision tower"):
        calibration_items(path, 10, with_images=False)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{not json}\n', r"calib.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n{"txt": "typo"}\n', r"calib.jsonl:2: expected"),
        ('{"image": "missing.png"}\n', r"calib.jsonl:1: .*missing.png"),
        ("\n\n", "no calibration samples"),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path, content, message):
    path = tmp_path / "calib.jsonl"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=message):
        load_calibration_file(path)


def test_bad_files_and_sizes(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        calibration_items(tmp_path / "nope.txt", 4, with_images=False)
    binary = tmp_path / "calib.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(CalibrationError, match="not a UTF-8 text file"):
        load_calibration_file(binary)
    for size in (0, -3, 2.5, True):
        with pytest.raises(CalibrationError, match="--calib-size"):
            calibration_items(None, size, with_images=False)


def test_binary_jsonl_directory_and_fifo_name_the_path(tmp_path):
    import os

    binary = tmp_path / "calib.jsonl"
    binary.write_bytes(b'{"text": "a"}\n\xff\xfe\x00\x81\n')
    with pytest.raises(CalibrationError, match=re.escape(f"{binary}: not a UTF-8 text file (invalid start byte at byte 14)")):
        load_calibration_file(binary)
    with pytest.raises(CalibrationError, match=re.escape(f"{tmp_path}: is a directory")):
        calibration_items(tmp_path, 4, with_images=False)
    fifo = tmp_path / "calib.fifo"
    os.mkfifo(fifo)
    with pytest.raises(CalibrationError, match=re.escape(f"{fifo}: is not a regular file")):
        load_calibration_file(fifo)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CalibrationError, match=re.escape(f"{empty}: no calibration samples in the file")):
        load_calibration_file(empty)


class _Toy(nn.Module):
    """A root module taking ``attention_mask`` like the network does, and two Linears on token-major inputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)
        self.unused = nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.b(self.a(input_ids))


def test_absmax_per_channel_over_real_tokens_only():
    torch.manual_seed(0)
    toy = _Toy()
    x1 = torch.randn(2, 5, 4)
    x2 = torch.randn(3, 2, 4)
    mask1 = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mask2 = torch.ones(3, 2, dtype=torch.long)
    x1[0, 3:] = 1000.0  # huge values on padding positions must not count

    def loop(model):
        model(x1, attention_mask=mask1)
        model(x2, mask2)  # positional mask too

    stats = collect_input_absmax(toy, ["a", "b"], loop)
    real = torch.cat([x1[mask1.bool()], x2.reshape(-1, 4)])
    torch.testing.assert_close(stats["a"], real.abs().amax(dim=0))
    with torch.no_grad():
        hidden = torch.cat([toy.a(x1)[mask1.bool()], toy.a(x2).reshape(-1, 3)])
    torch.testing.assert_close(stats["b"], hidden.abs().amax(dim=0))
    assert stats["a"].shape == (4,) and stats["a"].dtype == torch.float32
    # hooks are gone afterwards
    assert not toy.a._forward_pre_hooks and not toy._forward_pre_hooks


def test_modules_the_data_never_reaches_are_an_error():
    toy = _Toy()
    with pytest.raises(CalibrationError, match="never reached 1 quantized module"):
        collect_input_absmax(toy, ["a", "unused"], lambda m: m(torch.randn(1, 2, 4), torch.ones(1, 2)))
    with pytest.raises(CalibrationError, match="not an nn.Linear"):
        collect_input_absmax(nn.Sequential(nn.ReLU()), ["0"], lambda m: None)


def test_non_finite_activations_are_an_error():
    toy = _Toy()
    with pytest.raises(CalibrationError, match="non-finite"):
        collect_input_absmax(toy, ["a"], lambda m: m(torch.full((1, 2, 4), float("inf")), torch.ones(1, 2)))


def test_forward_loop_reaches_language_and_vision_linears(tiny_dir):
    """On the tiny model: texts reach every language Linear, images also reach the vision tower's."""
    from jev4.model.checkpoint import list_checkpoint_files
    from jev4.model.config import load_config
    from jev4.model.network import build_network, load_base_weights
    from jev4.model.preprocess import Preprocessor

    config = load_config(tiny_dir)
    net = build_network(config, torch.float32)
    load_base_weights(net, list_checkpoint_files(tiny_dir))
    pre = Preprocessor.from_dir(tiny_dir, config)
    language = [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.language_model.")]
    vision = [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.visual.")]
    assert len(language) == 14 and vision
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(56, 84, 3) * 255).astype(np.uint8))
    stats = collect_input_absmax(net, language + vision + ["multi_vector_projector"], make_forward_loop(pre, ["a query", "a passage", image], "retrieval", batch_size=2))
    assert set(stats) == set(language + vision + ["multi_vector_projector"])
    assert all(torch.isfinite(v).all() and (v > 0).any() for v in stats.values())
    with pytest.raises(CalibrationError, match="never reached"):
        collect_input_absmax(net, language + vision, make_forward_loop(pre, ["only", "texts"], "retrieval"))
