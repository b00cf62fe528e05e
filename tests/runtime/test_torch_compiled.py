"""The compiled, bucketed torch path (jev4.runtime.torch_compiled) against the eager reference, on CPU.

Compiling through inductor on this 2-core machine takes 30-130 s per bucket,
so most tests compile with ``backend="aot_eager"``: dynamo captures the same
graphs at the same bucket shapes (the padding, bucket choice, per-bucket
cache and output cutting are what is under test), without inductor's C++
code generation. One ``slow`` test runs inductor itself; the CUDA-graph and
torchao FP8 tests run on a GPU host (scripts/gpu-check.sh) and skip here
with the reason.
"""

import pytest
import torch

import jev4.runtime as rt
from jev4.errors import Jev4Error, ProviderError, SettingsError
from jev4.model.encoder import TorchEncoder
from jev4.model.preprocess import text_position_ids
from jev4.runtime.torch_compiled import BucketedForward, BucketOverflowError, CompileSettings, pad_to_bucket
from jev4.runtime.torchao_fp8 import check_torchao_fp8

SETTINGS = CompileSettings(batch_buckets=(2, 4), length_buckets=(32, 64), backend="aot_eager")
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _text(words: int, shift: int) -> str:
    return " ".join(WORDS[(i + shift) % len(WORDS)] for i in range(words))


# Lengths chosen to fall in both length buckets, including right at and just past the smaller one.
TEXTS = [_text(n, i) for i, n in enumerate((3, 12, 7, 9, 1, 8, 5, 15, 2))]


@pytest.fixture(scope="module")
def compiled(tiny_dir):
    return rt.load(tiny_dir, backend="torch", compile=SETTINGS, task="retrieval")


@pytest.fixture(scope="module")
def eager(compiled):
    """The eager reference over the very same merged weights."""
    return TorchEncoder(compiled.network, compiled.config, compiled.preprocessor, None, "cpu")


def test_texts_hit_both_length_buckets(compiled):
    lengths = compiled.preprocessor.token_lengths(["Query: " + t for t in TEXTS], 8192)
    assert min(lengths) <= 32 < max(lengths) <= 64
    assert 32 in lengths and any(32 < n <= 40 for n in lengths)  # at and just past the smaller bucket's edge


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_single_vectors_match_eager(compiled, eager, encoder, batch_size):
    got = compiled.encode_text(TEXTS, task="retrieval", batch_size=batch_size)
    ref = eager.encode_text(TEXTS, task="retrieval", batch_size=batch_size)
    assert got.shape == ref.shape == (len(TEXTS), compiled.config.truncate_dim or compiled.config.hidden_size)
    assert (got - ref).abs().max().item() <= 1e-5
    # Order preserved: row i is text i (each row is closest to its own reference row, and the texts differ).
    cos = got @ ref.T
    assert torch.equal(cos.argmax(dim=1), torch.arange(len(TEXTS)))
    # The unmerged LoRA reference (the session fixture) agrees too: merging is exact up to fp32 rounding.
    assert (got - encoder.encode_text(TEXTS, task="retrieval", batch_size=batch_size)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("batch_size", [2, 4])
def test_multi_vectors_match_eager(compiled, eager, batch_size):
    got = compiled.encode_text(TEXTS, task="retrieval", batch_size=batch_size, return_multivector=True)
    ref = eager.encode_text(TEXTS, task="retrieval", batch_size=batch_size, return_multivector=True)
    assert [g.shape for g in got] == [r.shape for r in ref]  # one row per valid token: padding cut off
    assert max((g - r).abs().max().item() for g, r in zip(got, ref)) <= 1e-5


def test_padded_batch_equals_unpadded(eager):
    """Length and batch padding change nothing for the batch's own rows (eager, no compile involved)."""
    inputs = eager.preprocessor.text_inputs(["Query: " + t for t in TEXTS[:3]], 64)
    batch, length = inputs.input_ids.shape
    padded = pad_to_bucket(inputs, (4, 64), eager.preprocessor.tokenizer.pad_token_id)
    assert padded.input_ids.shape == (4, 64) and torch.equal(padded.input_ids[:batch, :length], inputs.input_ids)
    assert padded.attention_mask[batch:].sum().item() == 1 and padded.attention_mask[:batch, length:].sum().item() == 0
    assert torch.equal(padded.position_ids, text_position_ids(padded.attention_mask))
    single, multi = eager._forward(inputs, ["retrieval"] * batch)
    p_single, p_multi = eager._forward(padded, ["retrieval"] * 4)
    assert torch.isfinite(p_single).all()  # the filler row has a valid token: no NaN from a fully masked row
    assert (p_single[:batch] - single).abs().max().item() <= 1e-5
    assert (p_multi[:batch, :length] - multi).abs().max().item() <= 1e-5
    assert p_multi[:batch, length:].abs().max().item() == 0.0
    with pytest.raises(Jev4Error, match="bucket 2 x 64"):
        pad_to_bucket(inputs, (2, 64), 0)


def test_one_compile_per_bucket(compiled, eager):
    from torch._dynamo.utils import counters

    compiled.warm_up([(2, 32)])
    seconds = dict(compiled.stats.compile_seconds)
    graphs = counters["stats"]["unique_graphs"]
    calls = compiled.stats.calls[(2, 32)]
    # Different raw shapes (1 x short, 2 x short) land in the warmed bucket: no new graph, no new compile entry.
    for texts in (TEXTS[4:5], TEXTS[4:5] + TEXTS[6:7], TEXTS[0:1]):
        got = compiled.encode_text(texts, batch_size=2)
        assert (got - eager.encode_text(texts, batch_size=2)).abs().max().item() <= 1e-5
    assert counters["stats"]["unique_graphs"] == graphs
    assert compiled.stats.compile_seconds == seconds
    assert compiled.stats.calls[(2, 32)] == calls + 3
    assert set(compiled.stats.compile_seconds) <= set(SETTINGS.buckets)
    assert all(s > 0 for s in compiled.stats.compile_seconds.values())
    report = compiled.stats.to_json()
    assert report["compile_seconds"]["2x32"] == seconds[(2, 32)] and report["calls"]["2x32"] == calls + 3


def test_overflow_runs_eagerly_or_refuses(compiled, eager):
    long = _text(30, 0)  # > 64 tokens: beyond the longest length bucket
    before = compiled.stats.eager_calls
    got = compiled.encode_text([long, TEXTS[0]], batch_size=2)
    assert (got - eager.encode_text([long, TEXTS[0]], batch_size=2)).abs().max().item() <= 1e-5
    assert compiled.stats.eager_calls == before + 1
    strict = BucketedForward(compiled.network, CompileSettings(batch_buckets=(2,), length_buckets=(32,), overflow="error", backend="aot_eager"), "cpu", 0)
    inputs = eager.preprocessor.text_inputs(["Query: " + long], 128)
    with pytest.raises(BucketOverflowError, match=r"batch 1 x length \d+ is beyond the largest bucket \(batch buckets \[2\], length buckets \[32\]\)"):
        strict(inputs)
    assert strict.stats.compile_seconds == {}


def test_layer_scope_matches_eager_and_compiles_one_layer_graph(tiny_dir, eager):
    """Regional compilation: every decoder layer shares one graph per bucket; outputs equal the eager reference."""
    from torch._dynamo.utils import counters

    enc = rt.load(tiny_dir, backend="torch", task="retrieval", compile=CompileSettings(batch_buckets=(4,), length_buckets=(64,), backend="aot_eager", scope="layers"))
    graphs = counters["stats"]["unique_graphs"]
    got = enc.encode_text(TEXTS, batch_size=4)
    assert (got - eager.encode_text(TEXTS, batch_size=4)).abs().max().item() <= 1e-5
    assert counters["stats"]["unique_graphs"] - graphs == 1  # 2 layers, 3 batches, one compiled graph
    assert list(enc.stats.compile_seconds) == [(4, 64)] and enc.stats.calls[(4, 64)] == 3
    long = _text(30, 0)  # beyond the bucket: eager, and no new compile of the layers
    assert (enc.encode_text([long], batch_size=4) - eager.encode_text([long], batch_size=4)).abs().max().item() <= 1e-5
    assert counters["stats"]["unique_graphs"] - graphs == 1 and enc.stats.eager_calls == 1


def test_settings():
    s = CompileSettings(batch_buckets=(8, 1, 8), length_buckets=(512, 128))
    assert s.batch_buckets == (1, 8) and s.length_buckets == (128, 512)
    assert s.bucket_for(1, 100) == (1, 128) and s.bucket_for(2, 128) == (8, 128) and s.bucket_for(8, 129) == (8, 512)
    assert s.bucket_for(9, 10) is None and s.bucket_for(1, 513) is None
    assert s.resolved_mode(torch.device("cpu")) == "default" and s.resolved_mode(torch.device("cuda")) == "reduce-overhead"
    assert CompileSettings(mode="max-autotune").resolved_mode(torch.device("cpu")) == "max-autotune"
    assert s.to_json()["batch_buckets"] == [1, 8] and s.to_json()["scheme"] == "torch-compile-bucketed"
    for bad in (dict(batch_buckets=()), dict(length_buckets=(0,)), dict(mode="fast"), dict(overflow="pad"), dict(batch_buckets=(True,)), dict(scope="model")):
        with pytest.raises(SettingsError):
            CompileSettings(**bad)


def test_load_refuses_compile_outside_torch(tiny_dir):
    with pytest.raises(Jev4Error, match="compile= is for the torch backend"):
        rt.load(tiny_dir, backend="onnxruntime", compile=True)
    with pytest.raises(SettingsError, match="compile must be True, False, None or a CompileSettings, got str"):
        rt.load(tiny_dir, backend="torch", compile="yes")
    with pytest.raises(Jev4Error, match="runs compiled only"):
        rt.load(tiny_dir, backend="torch", quantization="fp8-torchao", compile=False, task="retrieval")


def test_torchao_fp8_refuses_cpu(tiny_dir):
    with pytest.raises(ProviderError, match=r"fp8-torchao.*CUDA GPU.*device is 'cpu' \(no CUDA GPU\)"):
        rt.load(tiny_dir, backend="torch", quantization="fp8-torchao", task="retrieval", dtype="bf16")
    with pytest.raises(ProviderError, match="no CUDA GPU"):
        check_torchao_fp8("cpu", torch.bfloat16)


@pytest.mark.slow
def test_inductor_bucket_matches_eager(compiled, eager):
    """inductor itself (the default backend), one bucket: 30-130 s on this machine, so kept for make test-slow."""
    runner = BucketedForward(compiled.network, CompileSettings(batch_buckets=(2,), length_buckets=(64,)), "cpu", compiled.preprocessor.tokenizer.pad_token_id)
    inputs = eager.preprocessor.text_inputs(["Query: " + t for t in TEXTS[:2]], 64)
    with torch.inference_mode():
        single, multi = runner(inputs)
    ref_single, ref_multi = eager._forward(inputs, ["retrieval"] * 2)
    assert (single - ref_single).abs().max().item() <= 1e-5 and (multi - ref_multi).abs().max().item() <= 1e-5
    assert list(runner.stats.compile_seconds) == [(2, 64)]


def _gpu_skip_reason(torchao: bool = False) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine; runs on the GPU host (scripts/gpu-check.sh)"
    if torch.cuda.get_device_capability() < (8, 9) and torchao:
        return f"{torch.cuda.get_device_name()} has no FP8 tensor cores (compute capability < 8.9)"
    if torchao:
        try:
            import torchao  # noqa: F401
        except ImportError:
            return "torchao is not installed (pip install 'torchao==0.18.0'; gpu-check.sh installs it from $WHEELS)"
    return None


@pytest.mark.gpu
def test_cuda_graph_buckets_match_eager_bf16(tiny_dir):
    reason = _gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    settings = CompileSettings(batch_buckets=(4,), length_buckets=(64,))  # one bucket: one compile of the GPU host's time
    enc = rt.load(tiny_dir, backend="torch", compile=settings, task="retrieval", dtype="bf16", device="cuda")
    assert enc.runner.cuda_graphs and enc.runner.mode == "reduce-overhead"
    ref = TorchEncoder(enc.network, enc.config, enc.preprocessor, None, "cuda")
    for batch_size in (1, 3, 4):
        got = enc.encode_text(TEXTS, batch_size=batch_size)
        want = ref.encode_text(TEXTS, batch_size=batch_size)
        assert torch.nn.functional.cosine_similarity(got.double(), want.double()).min().item() >= 0.999
    assert set(enc.stats.compile_seconds) <= set(settings.buckets)


@pytest.mark.gpu
def test_torchao_fp8_close_to_bf16(tiny_dir, record_property):
    reason = _gpu_skip_reason(torchao=True)
    if reason:
        pytest.skip(reason)
    enc = rt.load(tiny_dir, backend="torch", quantization="fp8-torchao", task="retrieval", dtype="bf16", device="cuda",
                  compile=CompileSettings(batch_buckets=(4,), length_buckets=(64,)))  # fmt: skip
    ref = rt.load(tiny_dir, backend="torch", task="retrieval", dtype="fp32")
    got, want = enc.encode_text(TEXTS, batch_size=4), ref.encode_text(TEXTS, batch_size=4)
    cos = torch.nn.functional.cosine_similarity(got.double(), want.double())
    record_property("torchao_fp8_cosine_min", cos.min().item())
    assert cos.min().item() >= 0.99
    assert enc.quantization == "fp8-torchao" and enc.quantization_settings["layers"] > 0
