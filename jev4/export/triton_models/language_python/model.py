"""Triton python-backend model ``language`` (``--language-backend python``): the language graph on onnxruntime inside the python backend.

For a Triton without the onnxruntime backend (PyTriton's bundled server has
only the python backend): the same inputs, outputs and graph (``model.onnx``
beside this file) as the ``onnxruntime_onnx`` variant, so the ensemble is
identical whichever runs it.
"""

import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

INPUTS = ("input_ids", "attention_mask", "position_ids", "pooling_mask")


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        self.session = ort.InferenceSession(os.path.join(here, "model.onnx"), providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy().astype(np.int64) for name in INPUTS}
            try:
                single, multi = self.session.run(["single_vector", "multi_vector"], feed)
            except Exception as exc:  # onnxruntime raises its own types; the request fails alone
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"language: {exc}")))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("single_vector", single), pb_utils.Tensor("multi_vector", multi)]))
        return responses
