"""The project's import graph: no circles, and arrows only in the directions the stages allow.

The graph is read from the source (every import, function-local ones included; imports under
`if TYPE_CHECKING:` are annotations, never executed, and are left out), so a circle broken only by a
function-local import still counts."""
import ast
import re
from pathlib import Path

from polarprune import STAGES
from run_helpers import TRAINING_ONLY, modules_loaded_by

ROOT = Path(__file__).resolve().parents[1]


def project_modules() -> dict[str, Path]:
    """polarprune.<stage>... module name -> file, for every module of the stage folders and polarprune/."""
    modules = {}
    for folder in (*STAGES, "polarprune"):
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join(parts if parts[0] == "polarprune" else ["polarprune", *parts])] = path
    return modules


def _type_checking_only(tree: ast.AST) -> set[ast.AST]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {inner for statement in node.body for inner in ast.walk(statement)}
    return skipped


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a `from package import name` counts the submodule
    `name` when there is one, else the package)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_only(tree)
        for node in ast.walk(tree):
            if node in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "polarprune.export.programs" in graph["polarprune.export.api"]  # a relative import
    assert "polarprune.common.cli" in graph["polarprune.training.__main__"]  # an absolute one
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_lower_layers_import_no_upper_ones():
    """common imports no stage; serving imports neither training, export nor bench; training imports
    neither export, serving nor bench."""
    forbidden = {"common": ("training", "export", "serving", "bench"),
                 "serving": ("training", "export", "bench"),
                 "training": ("export", "serving", "bench")}
    wrong = [(name, target) for name, targets in import_graph().items() for target in sorted(targets)
             if name.split(".")[1] in forbidden and target.split(".")[1] in forbidden[name.split(".")[1]]]
    assert wrong == []


def test_export_imports_no_training_config_or_methods():
    """`python -m export` reads what training wrote; it does not rebuild training (its config, methods,
    loop or Python API). Running an export loads none of them either: tests/test_onnx_export.py."""
    loaded = modules_loaded_by("polarprune.export.__main__")
    assert "polarprune.export.api" in loaded
    assert sorted(m for m in loaded if m.startswith(TRAINING_ONLY)) == []


def test_modules_run_with_python_m_import_the_project_absolutely():
    """`python -m training` runs training/__main__.py as __main__ inside the bare package `training`: a
    relative import there would load a second copy of the stage under that name (with its own error
    classes) beside polarprune.training. So entry modules import polarprune.<stage> by name."""
    entries = [path for path in project_modules().values()
               if path.name == "__main__.py" or 'if __name__ == "__main__"' in path.read_text()]
    assert len(entries) >= 5
    relative = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in entries
                for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom) and node.level]
    assert relative == []


BARE_STAGE_IMPORT = re.compile(r"(?:^|\\n|;|\")[ \t]*(?:from|import) (?:training|export|serving|bench|common)(?=[. \t])",
                               re.MULTILINE)


def test_no_code_imports_a_stage_by_its_bare_name():
    """Everything imports polarprune.<stage>: a bare `training` or `common` is not installed, and in a
    checkout it is a second copy of the stage (its own error classes). Code in strings (child processes)
    counts too. After merging a branch written before the rename, re-run the rewrite of commit dbb00f1."""
    files = [path for folder in (*STAGES, "polarprune", "tests", "scripts") for path in (ROOT / folder).rglob("*.py")]
    assert len(files) > 100
    found = [f"{path.relative_to(ROOT)}:{path.read_text()[:match.start()].count(chr(10)) + 1}"
             for path in files for match in BARE_STAGE_IMPORT.finditer(path.read_text())]
    assert found == []
