"""The one ONNX exporter: export writes its files with it, and the latency table times the networks it
gives (torch's torch.export-based exporter, opset 18, input `input`, output `logits`, then onnx-graphsurgeon
folds constants, drops dead nodes and sorts the graph).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from polarprune.common.cli import EXIT_FAILED, PolarpruneError

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExporterError(PolarpruneError):
    """torch's ONNX exporter failed on a network (exit code 1)."""

    exit_code = EXIT_FAILED


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporters log progress, deprecations and missing-torchvision notes that say nothing here."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def to_onnx(model: nn.Module, input_shape: tuple[int, ...], batch: int | None = None,
            opset: int = OPSET) -> onnx.ModelProto:
    """The exported graph of `model` in eval mode, not yet cleaned: batch axis dynamic (batch None) or
    fixed at `batch`."""
    model.eval()
    example = torch.zeros(batch or 2, *input_shape)  # dynamic: batch 2, as 1 invites specialisation
    dynamic = None if batch else ({0: torch.export.Dim("batch", min=1)},)
    try:
        with quiet_exporter():
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, verbose=False,
                                         input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                         dynamic_shapes=dynamic)
    except Exception as error:  # the exporter raises many types
        raise ExporterError(f"ONNX export failed: {type(error).__name__}: {str(error).splitlines()[0]}") from None
    return program.model_proto


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup().toposort()
    return gs.export_onnx(graph)


def network_graph(model: nn.Module, input_shape: tuple[int, ...], batch: int | None = None,
                  opset: int = OPSET) -> onnx.ModelProto:
    """`model` as the cleaned ONNX graph export writes (`to_onnx`, then `clean_graph`)."""
    return clean_graph(to_onnx(model, input_shape, batch, opset))
