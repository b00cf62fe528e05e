"""Triton python-backend model ``pool``: the language graph's outputs -> what a client gets.

jev4's language graph already mean-pools over the mask and L2-normalises the
single vector, and projects, L2-normalises and masks the multi-vectors; what
is left is Matryoshka truncation (keep the first d dims, re-normalise; only
the dims the model was trained at, from config.pbtxt) and the per-row token
counts that make the zero-padded multi-vectors usable.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config["parameters"]
        self.hidden = int(params["hidden_size"]["string_value"])
        self.dims = sorted(int(d) for d in params["matryoshka_dims"]["string_value"].split(",") if d)

    def _outputs(self, request):
        single = pb_utils.get_input_tensor_by_name(request, "single_vector").as_numpy().astype(np.float32)
        multi = pb_utils.get_input_tensor_by_name(request, "multi_vector").as_numpy().astype(np.float32)
        mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()
        dims = pb_utils.get_input_tensor_by_name(request, "TRUNCATE_DIM").as_numpy().reshape(-1)
        if len(set(dims.tolist())) > 1:
            raise ValueError(f"one TRUNCATE_DIM per request, got {sorted(set(dims.tolist()))}")
        dim = int(dims[0]) if len(dims) else 0
        if dim not in (0, self.hidden) and dim not in self.dims:
            raise ValueError(f"TRUNCATE_DIM={dim} is not allowed; choose one of {self.dims}, {self.hidden} or 0 (no truncation)")
        if dim not in (0, self.hidden):
            single = single[:, :dim]
            single = single / np.maximum(np.linalg.norm(single, axis=-1, keepdims=True), 1e-12)
        lengths = mask.sum(axis=-1, keepdims=True).astype(np.int32)
        return [pb_utils.Tensor("SINGLE", single), pb_utils.Tensor("MULTI", multi), pb_utils.Tensor("LENGTHS", lengths)]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._outputs(request)))
            except ValueError as exc:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"pool: {exc}")))
        return responses
