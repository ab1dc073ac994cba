"""The installable package: a wheel built from this checkout, installed into a fresh venv outside the
repository, gives the `polarprune` command and runs the README's API example; no generic top-level names.

The fresh venv sees the project venv's packages through a .pth file (torch and the rest are not
reinstalled) and the wheel installs with --no-deps, so this needs no network."""
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from polarprune import STAGES

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "polarprune", *STAGES)


def check_build_backend() -> None:
    """The wheel is built with the project venv's setuptools (no download): it must be as new as
    pyproject.toml's build-system asks (make venv installs it)."""
    import re
    import tomllib

    import setuptools

    wanted = next(r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
                  if r.startswith("setuptools"))
    least = int(re.search(r">=(\d+)", wanted).group(1))
    assert int(setuptools.__version__.split(".")[0]) >= least, (
        f"the project venv has setuptools {setuptools.__version__}; building the wheel needs {wanted}: "
        f"run make venv, or {sys.executable} -m pip install '{wanted}'")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel built from a copy of the checkout's build inputs."""
    check_build_backend()
    work = tmp_path_factory.mktemp("package")
    source = work / "source"
    source.mkdir()
    for path in [*(ROOT / name for name in BUILD_INPUTS), *ROOT.glob("requirements*.txt")]:
        if path.is_dir():
            shutil.copytree(path, source / path.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / path.name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(source)],
                   check=True, cwd=work)
    wheels = list((work / "dist").glob("polarprune-*.whl"))
    assert len(wheels) == 1, f"expected one polarprune wheel, built {wheels}"
    env = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheels[0])], check=True)
    return env


def run_outside(venv: Path, *command: str) -> subprocess.CompletedProcess:
    """A command of the fresh venv, from a folder outside the repository, with no PYTHONPATH."""
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "OMP_WAIT_POLICY": "PASSIVE", "HOME": str(venv.parent)}
    return subprocess.run(command, cwd=venv.parent, env=env, capture_output=True, text=True, timeout=600)


def test_polarprune_command_is_installed(venv):
    done = run_outside(venv, str(venv / "bin" / "polarprune"), "--help")
    assert done.returncode == 0, done.stderr
    for command in ("train", "export", "serve", "bench", "compare"):
        assert command in done.stdout
    done = run_outside(venv, str(venv / "bin" / "polarprune"), "export", "--help")
    assert done.returncode == 0 and "--run" in done.stdout, done.stderr


def test_installed_package_has_no_generic_top_level_names(venv):
    probe = ("import importlib.util, polarprune, sys; "
             "print(polarprune.__file__); "
             f"print([n for n in {STAGES!r} if importlib.util.find_spec(n)])")
    done = run_outside(venv, str(venv / "bin" / "python"), "-c", probe)
    assert done.returncode == 0, done.stderr
    location, generic = done.stdout.splitlines()
    assert Path(location).is_relative_to(venv), f"polarprune imported from {location}, not the installed wheel"
    assert generic == "[]", f"top-level stage names importable from the installed venv: {generic}"


def test_readme_api_example_runs_against_the_installed_package(venv):
    script = ("import sys; from pathlib import Path; import polarprune; "
              f"assert Path(polarprune.__file__).is_relative_to({str(venv)!r}), polarprune.__file__; "
              f"sys.path.insert(0, {str(TESTS)!r}); "
              "from test_readme_api import run_readme_example; run_readme_example(Path.cwd()); print('ok')")
    done = run_outside(venv, str(venv / "bin" / "python"), "-c", script)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_public_api_names_resolve_in_the_checkout():
    import polarprune
    from polarprune.training.api import PolarizedNetwork, prune

    assert all(callable(getattr(polarprune, name)) for name in polarprune.__all__)  # each one imports
    assert polarprune.prune is prune and polarprune.PolarizedNetwork is PolarizedNetwork
    with pytest.raises(polarprune.PolarpruneError, match="prune takes what polarize returned, got Linear"):
        polarprune.prune(__import__("torch").nn.Linear(2, 2))
    with pytest.raises(AttributeError, match="no attribute 'polarise'"):
        polarprune.polarise  # noqa: B018
