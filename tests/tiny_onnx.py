"""A tiny ONNX classifier for repository and server tests (no torch export needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_classifier(path: Path, hidden: int = 16, batch_dim="N", seed: int = 0, side: int = 8) -> Path:
    """(N, 1, side, side) -> Flatten -> MatMul -> Relu -> MatMul -> (N, 10) logits."""
    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
               for n, s in (("w1", (side * side, hidden)), ("w2", (hidden, 10)))]
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch_dim, 1, side, side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch_dim, 10])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
