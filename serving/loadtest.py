"""Bounded load test, steady memory and energy per 1,000 inferences for a served dense/pruned pair.

Load test: batch-1 closed-loop clients at each concurrency level (1 ... 64) for a fixed time per model,
dense and pruned taking turns. Every request has a deadline and every level a hard stop; any exception
or wrong output shape is a failure. For a local server the resident memory of its whole process tree
(tritonserver + python-backend stubs) is sampled throughout; "steady memory" compares the RSS after
the first level (everything loaded, warmed and connected) with the RSS at the end, and the RSS over
the last level (one fixed load) on its own.

Energy: the server tree's CPU seconds over fixed-load windows (dense and pruned interleaved, medians),
turned into joules by common.energy.EnergyMeter: RAPL/NVML where readable, else a labelled estimate.
A remote server's CPU time is not visible from here, so its energy and memory are reported unavailable.

With 64 clients on 2 cores the Python client is itself the bottleneck: the numbers are what was
achieved against this server from this client, not the server's ceiling.
"""
from __future__ import annotations

import contextlib
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from polarprune.common.energy import EnergyMeter, tree_cpu_seconds, tree_rss_bytes
from polarprune.serving.probes import ROLES, ProbeSettings, _drive, longest_drive_s
from polarprune.serving.server import Endpoints
from polarprune.serving.server_memory import MB, memory_by_process

REMOTE_MEMORY = "resident memory of a remote server (--url) is not visible from this machine"
REMOTE_ENERGY = ("the server's CPU time is not visible for a remote server (--url), nor are its host's "
                 "RAPL/NVML counters; run the probes against the local server or meter the server host")


# ---- server memory ---------------------------------------------------------------------------------
class _RssSampler:
    """Samples the tree RSS of `root` every `interval_s` in a thread (bounded by the `with` block)."""

    def __init__(self, root: int, interval_s: float = 0.2):
        self.root, self.interval_s = root, interval_s
        self.samples: list[tuple[float, float]] = []  # (monotonic time, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now_mb(self) -> float:
        mb = tree_rss_bytes(self.root) / MB
        self.samples.append((time.monotonic(), mb))
        return mb

    def peak_mb(self, since: float) -> float | None:
        return max((mb for t, mb in self.samples if t >= since), default=None)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.now_mb()

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


def _steady_memory(sampler: _RssSampler, levels: list[dict], start_mb: float, early_mb: float,
                   end_mb: float, by_process_start: dict, by_process_end: dict) -> dict:
    """Growth after the first level includes a one-time step when the load first rises (allocator
    arenas, connection buffers; measured flat afterwards over repeated 64-client levels); growth within
    the last level, at one fixed load, is the purer leak signal."""
    growth = end_mb - early_mb
    last_level = levels[-len(ROLES):]
    return {"scope": "tritonserver process tree (server + python-backend stubs, both models)",
            "start_mb": start_mb, "after_first_level_mb": early_mb, "end_mb": end_mb,
            "peak_mb": max(mb for _, mb in sampler.samples), "samples": len(sampler.samples),
            "growth_mb": growth, "growth_pct": 100.0 * growth / early_mb,
            "last_level_growth_mb": last_level[-1]["rss_end_mb"] - last_level[0]["rss_start_mb"],
            "by_process_start_mb": by_process_start, "by_process_end_mb": by_process_end}


# ---- load test -------------------------------------------------------------------------------------
def run_load_test(endpoints: Endpoints, models: dict[str, str], images: np.ndarray,
                  settings: ProbeSettings, server_pid: int | None = None, log=print) -> dict:
    """Every concurrency level for dense and pruned in turn (alternating who goes first)."""
    protocol = settings.protocols[0]
    url = endpoints.url(protocol)
    batch = np.ascontiguousarray(images[:1])
    levels = []
    sampler = _RssSampler(server_pid) if server_pid else None

    def rss_mb() -> float | None:
        return sampler.now_mb() if sampler else None

    with sampler or contextlib.nullcontext():
        start_mb, start_parts = rss_mb(), memory_by_process(server_pid) if sampler else None
        early_mb = None
        for index, concurrency in enumerate(settings.load_concurrencies):
            log(f"load test: {concurrency} client(s), {settings.load_seconds:g} s per model ...")
            for role in (ROLES if index % 2 == 0 else ROLES[::-1]):
                began, before = time.monotonic(), rss_mb()
                measured = _drive(url, protocol, models[role], batch, concurrency, settings.load_seconds,
                                  timeout_s=settings.request_timeout_s)
                after = rss_mb()
                levels.append({"role": role, "model": models[role], "concurrency": concurrency, **measured,
                               "rss_start_mb": before, "rss_end_mb": after,
                               "rss_growth_mb": after - before if sampler else None,
                               "rss_peak_mb": sampler.peak_mb(began) if sampler else None})
            if index == 0:
                early_mb = rss_mb()
        end_mb, end_parts = rss_mb(), memory_by_process(server_pid) if sampler else None
    memory = (_steady_memory(sampler, levels, start_mb, early_mb, end_mb, start_parts, end_parts) if sampler
              else {"unavailable": REMOTE_MEMORY})
    return {"protocol": protocol, "batch_size": len(batch), "seconds_per_level": settings.load_seconds,
            "request_timeout_s": settings.request_timeout_s,
            "concurrencies": list(settings.load_concurrencies), "levels": levels, "memory": memory,
            "requests": sum(level["requests"] for level in levels),
            "failures": sum(level["failures"] for level in levels)}


# ---- energy ----------------------------------------------------------------------------------------
def probe_energy(endpoints: Endpoints, models: dict[str, str], images: np.ndarray,
                 settings: ProbeSettings, server_pid: int | None = None, log=print) -> dict:
    """Joules per 1,000 batch-1 inferences of each model under the same fixed load, from the server
    tree's CPU time (or RAPL/NVML) over interleaved windows; medians over the repeats."""
    if server_pid is None:
        return {"unavailable": REMOTE_ENERGY}
    protocol = settings.protocols[0]
    url = endpoints.url(protocol)
    batch = np.ascontiguousarray(images[:1])
    meter = EnergyMeter(cpu_seconds=lambda: tree_cpu_seconds(server_pid), scope="tritonserver process tree")
    log(f"energy: {settings.energy_repeats} x {settings.energy_seconds:g} s per model at "
        f"{settings.energy_concurrency} client(s), dense/pruned interleaved ...")
    windows = {role: [] for role in ROLES}
    reading = None
    for repeat in range(settings.energy_repeats):
        for role in (ROLES if repeat % 2 == 0 else ROLES[::-1]):
            meter.start()
            measured = _drive(url, protocol, models[role], batch, settings.energy_concurrency,
                              settings.energy_seconds, timeout_s=settings.request_timeout_s)
            reading = meter.stop()
            count = measured["requests"] * len(batch)  # inferences
            windows[role].append({
                "inferences": count, "failures": measured["failures"], "seconds": reading.seconds,
                "server_cpu_seconds": reading.cpu_seconds, "joules": reading.joules,
                "joules_per_1000": 1000.0 * reading.joules / count if count else None,
                "server_cpu_ms_per_inference": 1000.0 * reading.cpu_seconds / count if count else None})
    result = {"source": "estimate" if reading.estimated else "+".join(sorted(set(reading.sources.values()))),
              "estimated": reading.estimated, "sources": reading.sources, "scope": reading.scope,
              "assumptions": reading.assumptions, "protocol": protocol, "batch_size": len(batch),
              "concurrency": settings.energy_concurrency, "seconds_per_window": settings.energy_seconds,
              "repeats": settings.energy_repeats}
    for role in ROLES:
        def median(key: str) -> float | None:
            values = [w[key] for w in windows[role] if w[key] is not None]
            return statistics.median(values) if values else None
        result[role] = {"model": models[role], "joules_per_1000_inferences": median("joules_per_1000"),
                        "server_cpu_ms_per_inference": median("server_cpu_ms_per_inference"),
                        "inferences": sum(w["inferences"] for w in windows[role]),
                        "failures": sum(w["failures"] for w in windows[role]), "windows": windows[role]}
    dense, pruned = (result[r]["joules_per_1000_inferences"] for r in ROLES)
    result["pruned_over_dense"] = pruned / dense if dense and pruned else None
    return result


def run_load_probes(endpoints: Endpoints, models: dict[str, str], images: np.ndarray,
                    settings: ProbeSettings, server_pid: int | None = None, log=print) -> dict:
    """The load test, then the energy windows; `server_pid` None means a remote server."""
    return {"load_test": run_load_test(endpoints, models, images, settings, server_pid, log),
            "energy": probe_energy(endpoints, models, images, settings, server_pid, log)}


# ---- load in the background (reloads under load) ---------------------------------------------------
JOIN_SLACK_S = 5.0  # beyond the longest a drive can take, before its thread counts as hung


class BackgroundLoad:
    """`_drive` in a background thread until `stop()`, `max_seconds` being the hard cap:

        with BackgroundLoad(url, "http", model, batch, concurrency=8) as load:
            server.reload(model)
        load.result   # requests, failures, versions that answered, ...
    """

    def __init__(self, url: str, protocol: str, model: str, batch: np.ndarray, concurrency: int,
                 max_seconds: float = 120.0, timeout_s: float = 10.0):
        self.max_seconds, self.timeout_s = max_seconds, timeout_s
        self.result: dict | None = None
        self._failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        args=(url, protocol, model, batch, concurrency))

    def _run(self, *args) -> None:
        try:
            self.result = _drive(*args, self.max_seconds, timeout_s=self.timeout_s, stop=self._stop)
        except BaseException as failure:  # re-raised in stop()
            self._failure = failure

    def start(self) -> "BackgroundLoad":
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=longest_drive_s(self.max_seconds, self.timeout_s) + JOIN_SLACK_S)
        if self._failure is not None:
            raise RuntimeError(f"background load failed to run: {self._failure!r}") from self._failure
        if self.result is None:
            raise RuntimeError("background load did not finish within its hard cap")
        return self.result

    def __enter__(self) -> "BackgroundLoad":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
