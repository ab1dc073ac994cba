"""Optional measurements with NVIDIA's perf_analyzer (C++ load generator), when its binary is present.

The PyPI `perf-analyzer` package is an empty placeholder and the newer wheels need a newer glibc than
Debian 12; the binary inside the tritonclient==2.41.1 wheel works once `libb64.so.0d` and
`libcudart.so.12` (both shipped, under hashed names, in `nvidia_pytriton.libs`) are on its library path.
Found via `--perf-analyzer PATH`, $PERF_ANALYZER, PATH or the venv's bin/; otherwise the probe is
skipped with a one-line note. `python -m serving.perf_analyzer --install` puts the 2.41.1 binary in
the venv's bin/ (pip download of that one wheel, nothing installed).
"""
from __future__ import annotations

import csv
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from polarprune.common.cli import EXIT_FAILED, EXIT_OK, cli_parser

WHEEL_PIN = "tritonclient==2.41.1"
_WHEEL_MEMBER = "tritonclient-2.41.1.data/data/bin/perf_analyzer"
_LIB_ALIASES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}
INSTALL_HINT = f"python -m serving.perf_analyzer --install (extracts it from the {WHEEL_PIN} wheel)"


def _pytriton_libs() -> Path | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = Path(list(spec.submodule_search_locations)[0]).parent / "nvidia_pytriton.libs"
    return libs if libs.is_dir() else None


@dataclass
class PerfAnalyzer:
    binary: Path
    lib_dir: Path | None = None  # temp dir of symlinks giving the bundled libs their plain sonames

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.lib_dir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(self.lib_dir), env.get("LD_LIBRARY_PATH", "")) if p)
        return env

    def version(self) -> str | None:
        try:
            done = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True,
                                  env=self.env(), timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        text = (done.stdout + done.stderr).strip()
        return text.splitlines()[0] if done.returncode == 0 and "Perf Analyzer" in text else None

    def measure(self, model: str, url: str, protocol: str, concurrency: int, batch_size: int = 1,
                measurement_ms: int = 1000, max_trials: int = 8, stability_percent: int = 25,
                timeout_s: float = 120.0) -> dict:
        """One concurrency level: perf_analyzer's CSV row (latencies in microseconds), or an error.

        An unstable measurement (common on a busy machine) is retried once with a doubled window.
        """
        row = self._measure_once(model, url, protocol, concurrency, batch_size, measurement_ms,
                                 max_trials, stability_percent, timeout_s)
        if "stable" in row.get("error", ""):
            row = self._measure_once(model, url, protocol, concurrency, batch_size, 2 * measurement_ms,
                                     max_trials, stability_percent, timeout_s)
        return row

    def _measure_once(self, model, url, protocol, concurrency, batch_size, measurement_ms, max_trials,
                      stability_percent, timeout_s) -> dict:
        with tempfile.TemporaryDirectory(prefix="polarprune-pa-") as scratch:
            csv_path = Path(scratch) / "result.csv"
            command = [str(self.binary), "-m", model, "-u", url, "-i", protocol, "-b", str(batch_size),
                       f"--concurrency-range={concurrency}:{concurrency}",
                       f"--measurement-interval={measurement_ms}", f"--max-trials={max_trials}",
                       # 10% (the default) is rarely reached on a shared 2-core machine
                       f"--stability-percentage={stability_percent}",
                       # its default random bytes decode to NaN/Inf floats, which model.py rejects
                       "--input-data=zero", "-f", str(csv_path)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, env=self.env(),
                                      timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return {"error": f"timed out after {timeout_s:.0f} s"}
            rows = list(csv.DictReader(io.StringIO(csv_path.read_text()))) if csv_path.exists() else []
        if done.returncode != 0 or not rows:
            lines = (done.stderr or done.stdout).strip().splitlines()
            return {"error": f"exit {done.returncode}: {lines[-1] if lines else 'no output'}"}
        row = rows[-1]
        number = lambda key: float(row[key]) if row.get(key) not in (None, "") else None
        return {
            "concurrency": concurrency, "batch_size": batch_size,
            "infer_per_s": number("Inferences/Second"),
            "p50_us": number("p50 latency"), "p90_us": number("p90 latency"),
            "p95_us": number("p95 latency"), "p99_us": number("p99 latency"),
            "server_queue_us": number("Server Queue"),
            "server_compute_infer_us": number("Server Compute Infer"),
        }

    def close(self) -> None:
        if self.lib_dir is not None:
            shutil.rmtree(self.lib_dir, ignore_errors=True)
            self.lib_dir = None


def find_perf_analyzer(explicit: str | None = None) -> tuple[PerfAnalyzer | None, str]:
    """(a working PerfAnalyzer, its version) or (None, a one-line reason it is skipped)."""
    candidates = [explicit, os.environ.get("PERF_ANALYZER"), shutil.which("perf_analyzer"),
                  str(Path(sys.executable).parent / "perf_analyzer")]
    binary = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if binary is None:
        return None, f"perf_analyzer not found, skipped; to add it: {INSTALL_HINT}"
    lib_dir = None
    libs = _pytriton_libs()
    if libs is not None:
        lib_dir = Path(tempfile.mkdtemp(prefix="polarprune-pa-libs-"))
        for soname, pattern in _LIB_ALIASES.items():
            match = sorted(libs.glob(pattern))
            if match:
                (lib_dir / soname).symlink_to(match[0])
    analyzer = PerfAnalyzer(binary, lib_dir)
    version = analyzer.version()
    if version is None:
        analyzer.close()
        return None, (f"{binary} does not run here (placeholder, or libb64/libcudart missing), skipped; "
                      f"{INSTALL_HINT}")
    return analyzer, version


def install_binary(dest_dir: Path) -> Path:
    """Download the tritonclient 2.41.1 wheel with pip (no install) and extract perf_analyzer only."""
    with tempfile.TemporaryDirectory(prefix="polarprune-pa-wheel-") as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", scratch,
                        WHEEL_PIN], check=True)
        wheel = next(Path(scratch).glob("tritonclient-2.41.1-*.whl"))
        dest_dir.mkdir(parents=True, exist_ok=True)
        target = dest_dir / "perf_analyzer"
        with zipfile.ZipFile(wheel) as archive, open(f"{target}.part", "wb") as out:
            out.write(archive.read(_WHEEL_MEMBER))
        os.chmod(f"{target}.part", 0o755)
        os.replace(f"{target}.part", target)
    return target


def main(argv: list[str] | None = None) -> int:
    arguments = cli_parser("python -m serving.perf_analyzer", __doc__.split("\n")[0],
                       epilog="Exits with 1 when no working perf_analyzer is found.")
    arguments.add_argument("--install", action="store_true", help=f"extract perf_analyzer from {WHEEL_PIN}")
    arguments.add_argument("--dest", type=Path, default=Path(sys.executable).parent)
    args = arguments.parse_args(argv)
    installed = None
    if args.install:
        installed = install_binary(args.dest)
        print(f"installed {installed}")
    analyzer, note = find_perf_analyzer(str(installed) if installed else None)
    print(f"{analyzer.binary}: {note}" if analyzer else note)
    if analyzer:
        analyzer.close()
    return EXIT_OK if analyzer else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
