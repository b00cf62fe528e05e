"""The encoder's input and output checks hold for onnxruntime too: they live in the shared Encoder path."""

import re

import numpy as np
import pytest

import jev4.runtime as rt
from jev4.errors import EncodeError

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def ort_encoder(onnx_artifacts):
    return rt.load(onnx_artifacts["code"], backend="onnxruntime", provider="cpu")


def test_invalid_unicode_and_non_str(ort_encoder):
    with pytest.raises(
        EncodeError,
        match=re.escape(r"text #1 is not valid Unicode: lone surrogate '\ud800' at position 3; decode your input as UTF-8 (invalid bytes?)"),
    ):
        ort_encoder.encode_text(["fine", "abc\ud800def"], task="code")
    with pytest.raises(EncodeError, match=r"^text #0 is of type float, not str"):
        ort_encoder.encode_text([1.5], task="code")


class _NanRows:
    """Stands in for the language session: the real outputs, with a NaN at the rows whose token count is ``length``."""

    def __init__(self, session, length):
        self.session, self.length = session, length

    def run(self, names, feed):
        single, multi = (x.copy() for x in self.session.run(names, feed))
        for row, n in enumerate(feed["attention_mask"].sum(axis=1)):
            if n == self.length:
                single[row, 0] = np.nan
                multi[row, n - 1, 3] = np.nan
        return single, multi


def test_non_finite_output_names_the_input(ort_encoder, monkeypatch):
    texts = ["a short one", "a somewhat longer text, with more tokens in it", "mid-sized text"]
    lengths = ort_encoder.preprocessor.token_lengths(["Query: " + t for t in texts], 512)
    assert len(set(lengths)) == 3
    monkeypatch.setitem(ort_encoder.sessions, "language", _NanRows(ort_encoder.sessions["language"], lengths[2]))
    for kind, multivector in (("vector", False), ("multi-vector", True)):
        with pytest.raises(EncodeError, match=re.escape(f"text #2 'mid-sized text': the model produced a non-finite {kind} (NaN or inf)")):
            ort_encoder.encode_text(texts, task="code", return_multivector=multivector)
    assert np.isfinite(ort_encoder.encode_text(texts[:2], task="code").numpy()).all()
