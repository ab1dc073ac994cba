"""A network as a torch.export program file: architecture and weights in one file that loads without the
code that made it (no pickle, never "size mismatch"), and the files of a folder `python -m export` reads.
Training writes them, export reads them: this module needs neither the training config nor its methods.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
from torch import nn

from polarprune.common.atomicio import write_bytes

from .errors import TrainingError


class ProgramError(TrainingError, ValueError):
    """A file that is not a program `save_pruned` wrote."""


def save_pruned(path: str | Path, pruned: nn.Module, example_input: torch.Tensor) -> None:
    """Write `pruned` (architecture and weights) as a torch.export program with a dynamic batch axis."""
    pruned = pruned.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()  # batch 2: no 0/1 specialising
    program = torch.export.export(pruned, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    write_bytes(path, buffer.getvalue())


def check_program(path: str | Path) -> None:
    """Refuse, in one line, a file that is not a `save_pruned` program: missing, not a zip archive, or a
    torch.save file (a state dict or a pickled module)."""
    path = Path(path)
    if not path.is_file():
        raise ProgramError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ProgramError(f"{path}: not a program written by save_pruned (not a zip archive)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if not any(name.endswith("archive_format") for name in names):
        what = "a torch.save file (a state dict or a pickled module)" if any(
            name.endswith("data.pkl") for name in names) else "a zip archive of something else"
        raise ProgramError(f"{path}: {what}, not a program written by save_pruned; load a state dict into "
                           "your network with load_state_dict")


def load_pruned(path: str | Path) -> nn.Module:
    """A network saved by `save_pruned`, ready for inference (no user code needed), with the module paths
    and state-dict keys of the network that was saved. The program was captured in inference mode and
    stays so: its train()/eval() only set the flag (an exported graph refuses to switch modes itself)."""
    check_program(path)
    network = torch.export.load(str(path)).module()

    def set_mode(mode: bool = True) -> nn.Module:
        network.training = mode
        return network
    network.train, network.eval = set_mode, lambda: set_mode(False)  # torch.export sets both to raise
    return network


PROGRAM_FILES = {"pruned": "pruned.pt2", "dense": "dense.pt2", "samples": "test_samples.npz"}


NORMALIZATION_FILE = "normalization.json"  # optional beside PROGRAM_FILES: the input normalisation
