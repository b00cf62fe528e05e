"""Triton python-backend model ``preprocess``: texts -> the token inputs of jev4's language graph.

Standalone on purpose (a Triton container has numpy and ``tokenizers``, not
jev4): the prompt prefixes, the pad id and the token limit come from this
model's config.pbtxt parameters, written by ``jev4 triton-repo`` from jev4's
own tables, and the tokenizer is the artifact's ``tokenizer.json`` copied
beside this file (``tokenizers`` encodes exactly as jev4's Qwen2Tokenizer).
Position ids are written batch-first ([B, 3, T]) so that Triton can batch
them; the repository's language graph transposes them back.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


def _param(config, key):
    return config["parameters"][key]["string_value"]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = os.path.join(args["model_repository"], args["model_version"])
        self.prefixes = json.loads(_param(config, "prefixes"))
        self.query_only = _param(config, "query_only") == "true"
        self.pad_id = int(_param(config, "pad_token_id"))
        self.tokenizer = Tokenizer.from_file(os.path.join(here, "tokenizer.json"))
        self.tokenizer.enable_truncation(int(_param(config, "max_length")))
        self.tokenizer.enable_padding(pad_id=self.pad_id)

    def _inputs(self, request):
        texts = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
        prompts = pb_utils.get_input_tensor_by_name(request, "PROMPT_NAME").as_numpy().reshape(-1)
        prompted = []
        for index, (text, prompt) in enumerate(zip(texts, prompts)):
            name = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
            name = "query" if self.query_only or not name else name
            if name not in self.prefixes:
                raise ValueError(f"row {index}: unknown PROMPT_NAME {name!r}; choose one of {sorted(self.prefixes)}")
            body = text.decode("utf-8") if isinstance(text, bytes) else str(text)
            prompted.append(self.prefixes[name] + body)
        encoded = self.tokenizer.encode_batch(prompted)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        positions = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)
        position_ids = np.repeat(positions[:, None, :], 3, axis=1)  # [B, 3, T]: text shares one id over the M-RoPE sections
        return [
            pb_utils.Tensor("input_ids", ids),
            pb_utils.Tensor("attention_mask", mask),
            pb_utils.Tensor("position_ids", position_ids),
            pb_utils.Tensor("pooling_mask", mask.copy()),
        ]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._inputs(request)))
            except (ValueError, UnicodeDecodeError) as exc:  # one bad request fails alone
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"preprocess: {exc}")))
        return responses
