"""Triton python-backend model that serves `model.onnx` (same version folder) through onnxruntime.

export/triton_repo.py copies this file as `model.py` into every CPU version folder. The bundled Triton
build has no onnxruntime backend, so this is how ONNX is served on CPU.

`execute` receives every request of one dynamic batch: valid ones are concatenated into ONE
`session.run` and the logits are split back; a bad request (wrong dtype or shape, no images, NaN/Inf,
which a classifier would turn into a silent argmax) gets its own INVALID_ARG error response and never
fails its neighbours or the model. `initialize` refuses a config.pbtxt whose input or output disagrees
with model.onnx, so the load fails with the reason instead of every request failing later.
Tunables come from the config's `parameters`:
  intra_op_thread_count  onnxruntime intra-op threads (0 = onnxruntime decides, export's default). With 1
                         the session has no pool at all: no worker is woken per request (docs/serving.md
                         has the measured comparison)
  allow_spinning         "0" (default) stops idle ORT threads spinning, which on a small CPU steals
                         cycles from the other loaded model and from the client
The per-request path is kept short (docs/serving.md): a lone request, the common case at low load, runs
its own array without a concatenate/split copy, and the NaN/Inf check is one float64 sum (per-image
detail only when it is not finite).
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _parameter(config: dict, key: str, default: str) -> str:
    entry = config.get("parameters", {}).get(key)
    return entry["string_value"] if entry else default


def _request_error(message: str):
    """A client error (HTTP 400 / gRPC INVALID_ARGUMENT), not an internal one, where the stub has codes."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def _check_against_onnx(config: dict, session, onnx_path: str) -> None:
    """config.pbtxt's input/output name and sample dims must be those of the ONNX graph."""
    for kind, declared, actual in (("input", config["input"][0], session.get_inputs()[0]),
                                   ("output", config["output"][0], session.get_outputs()[0])):
        dims = [int(d) for d in declared["dims"]]
        onnx_dims = [d if isinstance(d, int) else -1 for d in actual.shape[1:]]  # symbolic dims: any
        fits = len(dims) == len(onnx_dims) and all(o in (-1, d) for d, o in zip(dims, onnx_dims))
        if declared["name"] != actual.name or not fits:
            raise ValueError(f"config.pbtxt declares {kind} '{declared['name']}' with dims {dims}, but "
                             f"{onnx_path} has {kind} '{actual.name}' with dims {onnx_dims} (batch excluded); "
                             f"re-export the model or fix config.pbtxt")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.sample_dims = tuple(int(d) for d in config["input"][0]["dims"])
        self.max_batch_size = int(config.get("max_batch_size", 0))

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(_parameter(config, "intra_op_thread_count", "0"))
        options.inter_op_num_threads = 1
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", _parameter(config, "allow_spinning", "0"))
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        onnx_path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        if not os.path.isfile(onnx_path):
            raise FileNotFoundError(f"{onnx_path} is missing: a version folder needs model.onnx beside model.py")
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        _check_against_onnx(config, self.session, onnx_path)
        self.session_input = self.session.get_inputs()[0].name
        self.outputs = [self.session.get_outputs()[0].name]

    def _checked_batch(self, request) -> np.ndarray:
        """The request's input as float32 (N, *dims); raises ValueError with a readable reason."""
        tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:
            raise ValueError(f"missing input '{self.input_name}'")
        batch = tensor.as_numpy()
        if batch.dtype != np.float32:
            raise ValueError(f"input '{self.input_name}' must be FP32, got {batch.dtype}")
        if batch.ndim != len(self.sample_dims) + 1 or tuple(batch.shape[1:]) != self.sample_dims:
            raise ValueError(f"input '{self.input_name}' must have shape [N, "
                             f"{', '.join(map(str, self.sample_dims))}], got {list(batch.shape)}")
        if len(batch) == 0:
            raise ValueError(f"input '{self.input_name}' holds no images (batch of 0)")
        # The float64 sum of float32 values is finite exactly when every value is (it cannot overflow), and
        # the common path allocates no boolean array; the per-image detail only on failure.
        if not np.isfinite(batch.sum(dtype=np.float64)):
            bad = np.flatnonzero(~np.isfinite(batch).reshape(len(batch), -1).all(axis=1))
            raise ValueError(f"input '{self.input_name}' contains NaN or Inf (image(s) "
                             f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''} of {len(batch)})")
        return batch

    def execute(self, requests):
        responses = [None] * len(requests)
        batches, owners = [], []
        for i, request in enumerate(requests):
            try:
                batches.append(self._checked_batch(request))
                owners.append(i)
            except ValueError as bad:
                responses[i] = pb_utils.InferenceResponse(error=_request_error(str(bad)))
        if batches:
            joined = batches[0] if len(batches) == 1 else np.concatenate(batches)
            try:
                logits = self.session.run(self.outputs, {self.session_input: joined})[0]
            except Exception as failure:  # an ORT failure answers the requests, it must not kill the stub
                message = f"onnxruntime failed: {failure}"
                for i in owners:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
                return responses
            parts = [logits] if len(batches) == 1 else np.split(logits, np.cumsum([len(b) for b in batches])[:-1])
            for i, part in zip(owners, parts):
                out = pb_utils.Tensor(self.output_name, np.ascontiguousarray(part, dtype=np.float32))
                responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
        return responses

    def finalize(self) -> None:
        self.session = None
