"""The README's Python API example runs as written (in a temporary folder: it writes pruned.pt2)."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    found = re.search(r"<!-- python-api -->\s*```python\n(.*?)```\s*<!-- /python-api -->", text, re.S)
    assert found, "README.md has no Python API example between <!-- python-api --> markers"
    return found.group(1)


def run_readme_example(folder: Path) -> None:
    """Runs the README's example in `folder` (the current directory) and checks what it promises; also run
    by tests/test_package.py against an installed wheel."""
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    pruned, same, gated, example = (namespace[k] for k in ("pruned", "same", "gated", "example"))
    assert (folder / "pruned.pt2").is_file()
    assert abs(gated.flops_ratio() - 0.5) <= 0.05  # the target band, with round_to=8 widths
    gated.eval()
    with torch.no_grad():
        assert torch.allclose(pruned(example), gated(example), atol=1e-4)
        assert torch.allclose(same(example), pruned(example), atol=1e-6)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in namespace["model"].parameters())


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_readme_example(tmp_path)
