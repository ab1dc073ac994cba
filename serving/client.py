"""Classify images through Triton over HTTP or gRPC (tritonclient; no torch).

    with TritonClassifier("127.0.0.1:8000", "fmnist_resnet20_pruned") as model:
        labels = model.classify(images)          # float32 (N, C, H, W) or one (C, H, W) image

The model's input/output names, dims, dtype and max batch size are read from the server once; inputs
are checked against them BEFORE anything is sent (InputSpecError), and a request the server rejects
is relayed as ServingError with Triton's message.

Tensors always travel as binary data (never JSON lists). With `shared_memory=True` (a client on the
server's host) they do not travel over the socket at all: the input is written into a POSIX shared-memory
region registered with Triton (system shared memory) and the logits are read from a second one; only the
request header goes over HTTP/gRPC.
"""
from __future__ import annotations

import os
import time
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as system_shm
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from polarprune.common.cli import EXIT_BAD_INPUT
from polarprune.serving.errors import ServingStageError

PROTOCOLS = ("http", "grpc")
UNREGISTER_WAIT_S = 5.0  # how long close() waits for Triton to release a shared-memory region


class InputSpecError(ServingStageError, ValueError):
    """The input does not match what the model accepts; nothing was sent."""

    exit_code = EXIT_BAD_INPUT


class ServingError(ServingStageError, RuntimeError):
    """The server (or the connection to it) failed the request."""

    def __init__(self, model: str, status: str, message: str):
        super().__init__(f"{model}: server error ({status}): {message}")
        self.model, self.status, self.message = model, status, message


@dataclass(frozen=True)
class ModelSpec:
    """What one served classifier accepts: dims exclude the batch dimension."""

    name: str
    versions: tuple[str, ...]
    platform: str
    input_name: str
    input_dims: tuple[int, ...]
    datatype: str                 # Triton name, e.g. "FP32"
    output_name: str
    output_dims: tuple[int, ...]
    max_batch_size: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(triton_to_np_dtype(self.datatype))


def _relay(model: str, error: InferenceServerException) -> ServingError:
    return ServingError(model, str(error.status() or "no status"), error.message() or str(error))


class _SharedMemoryPair:
    """An input and an output region sized for one batch of max_batch_size, registered with the server."""

    def __init__(self, classifier: "TritonClassifier"):
        spec = classifier.spec
        if spec.max_batch_size < 1:
            raise ServingError(spec.name, "spec", "shared memory needs a model with max_batch_size >= 1")
        self.max_batch = spec.max_batch_size
        self.sample_bytes = {"input": int(np.prod(spec.input_dims)) * spec.dtype.itemsize,
                             "output": int(np.prod(spec.output_dims)) * np.dtype(np.float32).itemsize}
        tag = f"polarprune_client_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.names = {kind: f"{tag}_{kind}" for kind in self.sample_bytes}
        self.handles, self._client = {}, classifier
        try:
            for kind, name in self.names.items():
                size = self.sample_bytes[kind] * self.max_batch
                self.handles[kind] = system_shm.create_shared_memory_region(name, f"/{name}", size)
                classifier._call("register_system_shared_memory", name, f"/{name}", size, json_reply=False)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for kind, handle in list(self.handles.items()):
            self._unregister(self.names[kind])
            system_shm.destroy_shared_memory_region(handle)
        self.handles = {}

    def _unregister(self, name: str) -> None:
        """Unregister one region, waiting out the server's hold on it.

        The reply to a request can reach the client before Triton has released the request, and until then
        Triton (2.51) refuses to unregister its regions ("... it is currently in use"); later versions defer
        the unregister themselves. So "in use" is retried for up to UNREGISTER_WAIT_S. A server that cannot
        be reached took its registrations with it; anything else is a warning, not lost silently."""
        deadline = time.monotonic() + UNREGISTER_WAIT_S
        while True:
            try:
                self._client._call("unregister_system_shared_memory", name, json_reply=False)
                return
            except ServingError as failed:
                if "currently in use" in failed.message and time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                if failed.status == "connection" or "UNAVAILABLE" in failed.status:
                    return
                warnings.warn(f"shared-memory region {name} may stay registered with the server: {failed}",
                              RuntimeWarning, stacklevel=3)
                return


class TritonClassifier:
    """One served classifier over one protocol. Not thread-safe: use one instance per thread.

    `shared_memory=True`: tensors pass through system shared memory (client and server on one host)."""

    def __init__(self, url: str, model_name: str, protocol: str = "http", model_version: str = "",
                 timeout_s: float = 60.0, shared_memory: bool = False):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
        self.protocol, self.model_name, self.model_version = protocol, model_name, model_version
        self.timeout_s = timeout_s
        self._module = httpclient if protocol == "http" else grpcclient
        self._shm: _SharedMemoryPair | None = None
        if protocol == "http":
            self._client = httpclient.InferenceServerClient(
                url, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            self._client = grpcclient.InferenceServerClient(url)
        try:
            self.spec = self._read_spec()
            if shared_memory:
                self._shm = _SharedMemoryPair(self)
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, *args, json_reply: bool = True, **kwargs):
        """A metadata/config/statistics/admin call; replies as plain JSON-like dicts for both protocols."""
        if self.protocol == "grpc" and json_reply:
            kwargs["as_json"] = True
        try:
            return getattr(self._client, method)(*args, **kwargs)
        except InferenceServerException as failed:
            raise _relay(self.model_name, failed) from None
        except OSError as failed:
            raise ServingError(self.model_name, "connection", str(failed)) from None

    def _read_spec(self) -> ModelSpec:
        meta = self._call("get_model_metadata", self.model_name, self.model_version)
        config = self._call("get_model_config", self.model_name, self.model_version)
        config = config.get("config", config)  # gRPC wraps it
        if len(meta["inputs"]) != 1 or len(meta["outputs"]) != 1:
            raise ServingError(self.model_name, "spec", "expected a classifier with one input and one output")
        max_batch = int(config.get("max_batch_size", 0))
        # Metadata shapes include the batch dim (-1) when the model batches; gRPC sends them as strings.
        in_shape = [int(d) for d in meta["inputs"][0]["shape"]]
        out_shape = [int(d) for d in meta["outputs"][0]["shape"]]
        if max_batch > 0:
            in_shape, out_shape = in_shape[1:], out_shape[1:]
        return ModelSpec(
            name=meta["name"], versions=tuple(meta.get("versions", ())),
            platform=config.get("backend") or config.get("platform") or meta.get("platform", ""),
            input_name=meta["inputs"][0]["name"], input_dims=tuple(in_shape),
            datatype=meta["inputs"][0]["datatype"], output_name=meta["outputs"][0]["name"],
            output_dims=tuple(out_shape), max_batch_size=max_batch)

    # ---- input checks --------------------------------------------------------------------------
    def check(self, images) -> np.ndarray:
        """`images` as a batch the model accepts; InputSpecError (nothing sent) otherwise."""
        spec = self.spec
        expected = "[N, " + ", ".join(str(d) for d in spec.input_dims) + "]"
        if not isinstance(images, np.ndarray):
            raise InputSpecError(f"{spec.name}: expected a numpy array {expected} of {spec.dtype}, "
                                 f"got {type(images).__name__}")
        if images.dtype != spec.dtype:
            raise InputSpecError(f"{spec.name}: input must be {spec.datatype} ({spec.dtype}), got "
                                 f"{images.dtype}; convert with .astype(np.{spec.dtype})")
        if images.ndim == len(spec.input_dims):
            images = images[None]  # one sample
        fits = images.ndim == len(spec.input_dims) + 1 and all(
            want in (-1, got) for want, got in zip(spec.input_dims, images.shape[1:]))
        if not fits or images.shape[0] == 0:
            raise InputSpecError(f"{spec.name}: input shape must be {expected} with N >= 1, "
                                 f"got {list(images.shape)}")
        if images.dtype.kind == "f" and not np.isfinite(images).all():
            bad = np.flatnonzero(~np.isfinite(images.reshape(len(images), -1)).all(axis=1))
            raise InputSpecError(f"{spec.name}: input contains NaN or Inf (image(s) "
                                 f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''} of {len(images)})")
        return np.ascontiguousarray(images)

    # ---- inference -----------------------------------------------------------------------------
    def infer_once(self, batch: np.ndarray) -> np.ndarray:
        """ONE request with an already checked batch (at most max_batch_size): the raw output. Nothing is
        checked here, so whatever is wrong (an oversize batch too) comes back as the server's ServingError;
        `logits` checks first and splits large batches."""
        return self.infer_versioned(batch)[0]

    def infer_versioned(self, batch: np.ndarray) -> tuple[np.ndarray, str]:
        """`infer_once`, plus the model version that answered (it changes when a new version is loaded)."""
        spec = self.spec
        # The array's own datatype is declared: if it is wrong, the server says so, not a local guess.
        tensor = self._module.InferInput(spec.input_name, list(batch.shape), np_to_triton_dtype(batch.dtype))
        if self.protocol == "http":  # binary tensors, not JSON lists
            requested = httpclient.InferRequestedOutput(spec.output_name, binary_data=True)
            kwargs = {}
        else:
            requested = grpcclient.InferRequestedOutput(spec.output_name)
            kwargs = {"client_timeout": self.timeout_s}
        if self._shm is not None:
            self._place_in_shared_memory(batch, tensor, requested)
        elif self.protocol == "http":
            tensor.set_data_from_numpy(batch, binary_data=True)
        else:
            tensor.set_data_from_numpy(batch)
        try:
            result = self._client.infer(self.model_name, [tensor], model_version=self.model_version,
                                        outputs=[requested], **kwargs)
        except InferenceServerException as failed:
            raise _relay(self.model_name, failed) from None
        except OSError as failed:  # HTTP connection refused/reset
            raise ServingError(self.model_name, "connection", str(failed)) from None
        response = result.get_response()
        version = response.get("model_version", "") if self.protocol == "http" else response.model_version
        if self._shm is not None:  # a copy: the region is overwritten by the next request
            logits = system_shm.get_contents_as_numpy(self._shm.handles["output"], np.float32,
                                                      [len(batch), *spec.output_dims]).copy()
            return logits, str(version)
        return result.as_numpy(spec.output_name), str(version)

    def _place_in_shared_memory(self, batch: np.ndarray, tensor, requested) -> None:
        regions = self._shm
        if len(batch) > regions.max_batch or batch.nbytes > regions.sample_bytes["input"] * regions.max_batch:
            raise InputSpecError(f"{self.model_name}: a batch of {len(batch)} ({batch.nbytes} bytes) does not fit "
                                 f"the shared-memory region made for max_batch_size {regions.max_batch}; "
                                 "use logits(), which splits large batches")
        system_shm.set_shared_memory_region(regions.handles["input"], [batch])
        tensor.set_shared_memory(regions.names["input"], batch.nbytes)
        requested.set_shared_memory(regions.names["output"], regions.sample_bytes["output"] * len(batch))

    def logits(self, images) -> np.ndarray:
        """Raw outputs for any number of images (split into requests of at most max_batch_size)."""
        batch = self.check(images)
        step = self.spec.max_batch_size or len(batch)
        return np.concatenate([self.infer_once(batch[i:i + step]) for i in range(0, len(batch), step)])

    def classify(self, images) -> np.ndarray:
        """Top-1 class index per image."""
        return self.logits(images).argmax(axis=1)

    # ---- server-side view ----------------------------------------------------------------------
    def statistics(self) -> dict[str, int]:
        """Cumulative counters for this model (summed over loaded versions): counts and nanoseconds."""
        stats = self._call("get_inference_statistics", self.model_name, self.model_version)
        totals = dict.fromkeys(("inference_count", "execution_count", "success_count", "fail_count", "success_ns",
                                "queue_ns", "compute_input_ns", "compute_infer_ns", "compute_output_ns"), 0)
        for entry in stats.get("model_stats", []):
            totals["inference_count"] += int(entry.get("inference_count", 0))
            totals["execution_count"] += int(entry.get("execution_count", 0))
            parts = entry.get("inference_stats", {})
            totals["success_count"] += int(parts.get("success", {}).get("count", 0))
            totals["success_ns"] += int(parts.get("success", {}).get("ns", 0))  # request in, response out
            totals["fail_count"] += int(parts.get("fail", {}).get("count", 0))
            for key in ("queue", "compute_input", "compute_infer", "compute_output"):
                totals[f"{key}_ns"] += int(parts.get(key, {}).get("ns", 0))
        return totals

    def close(self) -> None:
        regions, self._shm = getattr(self, "_shm", None), None
        if regions is not None and getattr(self, "_client", None) is not None:
            regions.close()
        client, self._client = getattr(self, "_client", None), None
        if client is not None:
            client.close()

    def __enter__(self) -> "TritonClassifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
