"""Soak: dense and pruned under many concurrent clients for minutes, watched minute by minute.

    python -m serving soak --run runs/<name> [--repository DIR | --url HOST:PORT] [--minutes 10]

`clients` closed-loop clients (64 by default), each on its own connection, split evenly over the two
models, both protocols (HTTP and gRPC) and a mix of batch sizes. Per interval (a minute by default) and
per model: requests, failures by reason, p50/p99. For a local server, the resident memory of tritonserver
and of each python-backend stub is sampled every few seconds by a watcher process of its own
(`serving.server_memory`). A leak is judged on the growth of the server's whole process tree from the end
of the warm-up (the first interval) to the end.

A supervisor thread watches the server while the clients run:
- the server process gone (local) or not answering for `server_gone_s` (remote): the soak stops at once
  and raises ServerGone, which `python -m serving soak` prints as one line, exit 1;
- a python-backend stub killed (Triton 2.51 does not restart one: the model stays READY and every
  request fails with "Stub process ... is not healthy", after a one-second health check): the model's
  clients hold their next requests, the supervisor unloads and loads the model (a load alone is a no-op
  for an unchanged model) and lets them go on. Only the requests already in flight fail; each such
  event is recorded with its recovery time.

Every request has a deadline and the run a hard stop; the clients are joined with a bounded timeout.
"""
from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from polarprune.common.energy import process_tree
from polarprune.serving.admin import TritonAdmin
from polarprune.serving.client import TritonClassifier
from polarprune.serving.errors import ServerError
from polarprune.serving.probes import ROLES
from polarprune.serving.server_memory import MemoryWatch, process_label

STUB_DEAD = "is not healthy"      # Triton's message for a request to a model whose stub died
JOIN_GRACE_S = 5.0


class ServerGone(ServerError):
    """The server died or stopped answering during the soak (exit 1)."""


@dataclass(frozen=True)
class SoakSettings:
    seconds: float = 600.0
    clients: int = 64
    protocols: tuple[str, ...] = ("http", "grpc")
    batch_sizes: tuple[int, ...] = (1, 1, 4, 16)   # cycled over the clients: half of them send one image
    interval_s: float = 60.0           # one row of the report per interval
    memory_every_s: float = 2.0
    request_timeout_s: float = 10.0
    server_gone_s: float = 3.0         # a remote server not answering this long is gone
    reload_timeout_s: float = 60.0     # a model whose stub died must serve again within this
    max_requests_per_client: int = 2_000_000
    max_growth_pct: float = 5.0        # memory growth after warm-up that counts as a leak
    max_p99_ratio: float = 1.5         # p99 of the last interval over the first, per model

    def client_plan(self) -> list[tuple[str, str, int]]:
        """(role, protocol, batch size) of every client: roles alternate, then protocols, then batches."""
        plan = []
        for index in range(self.clients):
            role = ROLES[index % len(ROLES)]
            protocol = self.protocols[(index // len(ROLES)) % len(self.protocols)]
            batch = self.batch_sizes[(index // (len(ROLES) * len(self.protocols))) % len(self.batch_sizes)]
            plan.append((role, protocol, batch))
        return plan


@dataclass
class _ClientLog:
    """One client's own records (no locks: merged after the run)."""

    latencies: dict[int, list[float]] = field(default_factory=dict)           # interval -> ms
    failures: dict[int, Counter] = field(default_factory=dict)                # interval -> reason counts
    inferences: dict[int, int] = field(default_factory=dict)


def failure_reason(problem: Exception) -> str:
    """A short, stable reason: the message without the per-request details that would split counts."""
    text = f"{type(problem).__name__}: {problem}"
    if STUB_DEAD in text:
        return "stub process not healthy (python-backend stub died)"
    for marker in ("Connection refused", "connection reset", "Connection reset", "StatusCode.UNAVAILABLE",
                   "Broken pipe", "RemoteDisconnected"):
        if marker in text:
            return f"connection: {marker}"
    if "timed out" in text.lower() or "deadline" in text.lower():
        return "timeout"
    return text[:120]


def stub_pids(server_pid: int) -> dict[int, str]:
    """pid -> label ('<model> v<version> stub') of the server's live python-backend stubs."""
    stubs = {}
    for pid in process_tree(server_pid)[1:]:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        label = process_label(pid)  # a zombie's command line is empty: it is not listed
        if state != "Z" and label.endswith(" stub"):
            stubs[pid] = label
    return stubs


class _Supervisor:
    """Watches the server; holds a model's clients while a dead stub is replaced."""

    def __init__(self, http_url: str, models: dict[str, str], settings: SoakSettings, server_pid: int | None,
                 server_process=None, log=print):
        self.http_url, self.models, self.settings = http_url, models, settings
        self.server_pid, self.server_process, self.log = server_pid, server_process, log
        self.gates = {role: threading.Event() for role in models}
        for gate in self.gates.values():
            gate.set()
        self.stop = threading.Event()
        self.gone: str | None = None
        self.events: list[dict] = []
        self._reload_wanted: dict[str, float] = {}
        self._stubs: dict[int, str] = {}
        self._reloaded_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()  # soak() resets it when the last client has connected

    # called by clients
    def stub_died(self, role: str, seen: str, sent_at: float | None = None) -> None:
        """Hold `role`'s clients and reload it; a failure of a request sent before the last reload of
        the model was in flight at that reload and says nothing new."""
        with self._lock:
            if sent_at is not None and sent_at < self._reloaded_at.get(role, float("-inf")):
                return
            if self.gates[role].is_set():
                self.gates[role].clear()
                self._reload_wanted[role] = time.monotonic()
                self.log(f"soak: {self.models[role]}: {seen}; holding its clients and reloading it")

    def start(self) -> "_Supervisor":
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join(timeout=self.settings.reload_timeout_s + JOIN_GRACE_S)

    def _server_exit(self) -> str | None:
        """How the server this tool started ended (None: running, or not started by this tool)."""
        code = self.server_process.poll() if self.server_process is not None else None
        if code is None:
            return None
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"tritonserver (pid {self.server_process.pid}) {how}"

    def _server_alive(self, admin: TritonAdmin, since: list[float]) -> str | None:
        """None while the server is there; else why it is gone."""
        if self.server_process is not None:
            return self._server_exit()
        if admin.is_live():
            since[0] = time.monotonic()
            return None
        if time.monotonic() - since[0] > self.settings.server_gone_s:
            return f"the server at {self.http_url} stopped answering (no reply for {self.settings.server_gone_s:g} s)"
        return None

    def _check_stubs(self) -> None:
        """A stub seen before and gone now (killed, crashed): its model's clients are held at once."""
        if self.server_pid is None:
            return
        alive = stub_pids(self.server_pid)
        for pid, label in self._stubs.items():
            if pid not in alive:
                role = next((r for r, m in self.models.items() if label.startswith(f"{m} v")), None)
                if role is not None:
                    self.stub_died(role, f"its python-backend stub (pid {pid}) is gone")
        self._stubs = alive

    def _reload(self, role: str, noticed: float) -> None:
        model = self.models[role]
        began = time.monotonic()
        try:
            # A load of an unchanged model is a no-op in Triton, and the model still reads READY: unload it
            # (its clients are held, so nothing is sent meanwhile), then load it, which starts a new stub.
            with TritonAdmin(self.http_url, timeout_s=self.settings.reload_timeout_s) as admin:
                admin.unload(model)
                while admin.is_model_ready(model):
                    if time.monotonic() - began > self.settings.reload_timeout_s:
                        raise ServerError(f"{model} still ready {self.settings.reload_timeout_s:g} s after its unload")
                    time.sleep(0.02)
                admin.load(model)
                while not admin.is_model_ready(model):
                    if time.monotonic() - began > self.settings.reload_timeout_s:
                        raise ServerError(f"{model} not ready {self.settings.reload_timeout_s:g} s after its reload")
                    time.sleep(0.05)
        except ServerError as failed:  # the server itself may be what died (its stubs go with it)
            self.gone = self._server_exit() or f"{model}: its stub died and the reload failed ({failed})"
            self.stop.set()
            return
        done = time.monotonic()
        with self._lock:
            self._reloaded_at[role] = done
        self.events.append({"kind": "stub died", "role": role, "model": model,
                            "noticed_s": noticed - self.started, "reloaded_s": done - self.started,
                            "recovery_s": done - noticed})
        self.log(f"soak: {model} reloaded in {done - noticed:.1f} s; its clients go on")
        self.gates[role].set()

    def _run(self) -> None:
        since = [time.monotonic()]
        with TritonAdmin(self.http_url, timeout_s=1.0) as admin:
            while not self.stop.is_set():
                gone = self._server_alive(admin, since)
                if gone:
                    self.gone = gone
                    self.stop.set()
                    break
                self._check_stubs()
                with self._lock:
                    wanted, self._reload_wanted = self._reload_wanted, {}
                for role, noticed in wanted.items():
                    self._reload(role, noticed)
                if wanted and self.server_pid is not None:
                    self._stubs = stub_pids(self.server_pid)  # the unloads ended the old stubs: not deaths
                self.stop.wait(0.1)


def _client(slot: int, plan: tuple[str, str, int], urls: dict[str, str], models: dict[str, str],
            images: np.ndarray, settings: SoakSettings, supervisor: _Supervisor, window: dict,
            ready: threading.Barrier, logs: list[_ClientLog]) -> None:
    role, protocol, batch_size = plan
    log = logs[slot]
    batch = np.ascontiguousarray(np.resize(images, (batch_size, *images.shape[1:]))).astype(np.float32)
    requester = None
    try:
        requester = TritonClassifier(urls[protocol], models[role], protocol, timeout_s=settings.request_timeout_s)
        expected = (batch_size, *requester.spec.output_dims)
    except Exception as problem:  # counted in the first interval; still meet the barrier
        log.failures.setdefault(0, Counter())[failure_reason(problem)] += 1
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        return
    gate, sent = supervisor.gates[role], 0
    try:
        while requester is not None and not supervisor.stop.is_set() and sent < settings.max_requests_per_client:
            remaining = window["stop"] - time.perf_counter()
            if remaining <= 0:
                break
            if not gate.wait(timeout=min(remaining, 0.5)):  # held while the supervisor reloads the model
                continue
            start, sent_at = time.perf_counter(), time.monotonic()
            interval = int((start - window["start"]) // settings.interval_s)
            sent += 1
            try:
                output = requester.infer_once(batch)
                if output is None or tuple(output.shape) != expected:
                    raise ValueError(f"output shape {None if output is None else list(output.shape)}, "
                                     f"expected {list(expected)}")
            except Exception as problem:
                reason = failure_reason(problem)
                log.failures.setdefault(interval, Counter())[reason] += 1
                if STUB_DEAD in str(problem):
                    supervisor.stub_died(role, "a request failed: stub process not healthy", sent_at)
                time.sleep(0.01)  # a dead server must not turn the client into a busy loop
                continue
            log.latencies.setdefault(interval, []).append((time.perf_counter() - start) * 1e3)
            log.inferences[interval] = log.inferences.get(interval, 0) + batch_size
    finally:
        if requester is not None:
            requester.close()


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def soak(urls: dict[str, str], models: dict[str, str], images: np.ndarray, settings: SoakSettings,
         server_pid: int | None = None, server_process=None, log=print) -> dict:
    """Run the soak; the raw result (intervals, memory, events). ServerGone when the server goes away."""
    plan = settings.client_plan()
    load_before = os.getloadavg()
    supervisor = _Supervisor(urls["http"], models, settings, server_pid, server_process, log)
    logs = [_ClientLog() for _ in plan]
    # A process of its own samples the memory: this one's GIL belongs to the clients (serving.server_memory).
    watch = MemoryWatch(server_pid, settings.memory_every_s) if server_pid is not None else None
    try:
        elapsed, stuck = _run_clients(plan, logs, urls, models, images, settings, supervisor, log)
    finally:
        memory = watch.stop(since=supervisor.started) if watch is not None else []
    if supervisor.gone:
        raise ServerGone(f"{supervisor.gone} after {elapsed:.1f} s of the soak; stopped its {len(plan)} clients "
                         f"({stuck} still waiting on a request)")
    raw = _summarize_raw(plan, logs, supervisor, memory, settings, elapsed, stuck, models)
    raw["load_average"] = {"start": list(load_before), "end": list(os.getloadavg()),
                           "note": "1/5/15-minute load averages of the machine, the soak's own clients included"}
    return raw


def _run_clients(plan, logs, urls: dict[str, str], models: dict[str, str], images: np.ndarray,
                 settings: SoakSettings, supervisor: _Supervisor, log) -> tuple[float, int]:
    """Connect every client, run them for the window under the supervisor, join them: (seconds, stuck clients)."""
    window: dict = {}

    def open_window() -> None:
        """The soak's clock starts when the last client has connected; the memory samples and events
        count from the same moment, so each lands in the interval it belongs to however long connecting took."""
        supervisor.started = time.monotonic()
        window.update(start=time.perf_counter(), stop=time.perf_counter() + settings.seconds)

    ready = threading.Barrier(len(plan) + 1, timeout=60.0, action=open_window)
    threads = [threading.Thread(target=_client, daemon=True,
                                args=(slot, plan[slot], urls, models, images, settings, supervisor, window, ready,
                                      logs)) for slot in range(len(plan))]
    for thread in threads:
        thread.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        raise ServerError(f"the soak's {len(plan)} clients did not all connect within 60 s") from None
    supervisor.start()
    log(f"soak: {len(plan)} clients for {settings.seconds:g} s ({settings.seconds / 60:.1f} min), "
        f"intervals of {settings.interval_s:g} s ...")
    deadline = window["stop"]
    next_note = window["start"] + settings.interval_s
    while time.perf_counter() < deadline and not supervisor.stop.is_set():
        supervisor.stop.wait(min(0.2, max(deadline - time.perf_counter(), 0)))
        if time.perf_counter() >= next_note:
            done = sum(len(v) for client in logs for v in client.latencies.values())
            log(f"soak: {time.perf_counter() - window['start']:.0f} s, {done} requests answered")
            next_note += settings.interval_s
    supervisor.stop.set()
    hard_stop = time.perf_counter() + settings.request_timeout_s + JOIN_GRACE_S
    for thread in threads:
        thread.join(timeout=max(hard_stop - time.perf_counter(), 0.0))
    supervisor.join()
    elapsed = time.perf_counter() - window["start"]
    stuck = sum(thread.is_alive() for thread in threads)
    return elapsed, stuck


def _summarize_raw(plan, logs, supervisor: _Supervisor, memory: list[dict], settings: SoakSettings, elapsed: float,
                   stuck: int, models: dict[str, str]) -> dict:
    # Whole intervals only: a shorter tail (the window's rest, the last requests) joins the last one.
    count = max(1, min(math.floor(elapsed / settings.interval_s + 1e-6),
                       math.floor(settings.seconds / settings.interval_s + 1e-6)))
    intervals = []
    for index in range(count):
        row = {"interval": index, "start_s": index * settings.interval_s, "roles": {}}
        for role in ROLES:
            lat, fails, inferences, by_protocol = [], Counter(), 0, Counter()
            last = index == count - 1
            for (client_role, protocol, _), client in zip(plan, logs):
                if client_role != role:
                    continue
                for key in ([k for k in client.latencies if k >= index] if last else [index]):
                    values = client.latencies.get(key, [])
                    lat.extend(values)
                    by_protocol[protocol] += len(values)
                    inferences += client.inferences.get(key, 0)
                for key in ([k for k in client.failures if k >= index] if last else [index]):
                    fails.update(client.failures.get(key, Counter()))
            row["roles"][role] = {"requests": len(lat), "inferences": inferences,
                                  "requests_by_protocol": dict(by_protocol), "failures": sum(fails.values()),
                                  "failures_by_reason": dict(fails), "p50_ms": _percentile(lat, 50),
                                  "p99_ms": _percentile(lat, 99)}
        intervals.append(row)
    return {"settings": asdict(settings), "models": models, "seconds": elapsed, "clients": len(plan),
            "started_monotonic": supervisor.started,
            "client_plan": [list(p) for p in plan], "stuck_clients": stuck, "intervals": intervals,
            "memory_samples": memory, "events": supervisor.events}


def memory_per_interval(samples: list[dict], interval_s: float, count: int) -> list[dict]:
    """The last memory sample of each interval (None where none fell in it)."""
    rows = []
    for index in range(count):
        inside = [s for s in samples if index * interval_s <= s["t"] < (index + 1) * interval_s]
        if index == count - 1:
            inside = [s for s in samples if s["t"] >= index * interval_s] or inside
        last = inside[-1] if inside else None
        rows.append({"interval": index, "total_mb": last["total_mb"] if last else None,
                     "by_process": last["by_process"] if last else None})
    return rows


def leak_check(samples: list[dict], warmup_s: float, max_growth_pct: float) -> dict:
    """Growth of the server tree's RSS from the end of the warm-up to the end of the run. The reference is
    the median of the samples in the last tenth of the warm-up and the end the median of the last tenth
    of the run, so one sample's jitter does not decide."""
    if not samples:
        return {"unavailable": "no memory samples (a remote server's memory is not visible from here)"}
    end_t = samples[-1]["t"]
    warm = [s["total_mb"] for s in samples if 0.9 * warmup_s <= s["t"] <= warmup_s] or \
        [s["total_mb"] for s in samples if s["t"] <= warmup_s][-1:]
    tail = [s["total_mb"] for s in samples if s["t"] >= warmup_s + 0.9 * (end_t - warmup_s)]
    if not warm or not tail or end_t <= warmup_s:
        return {"unavailable": f"the run was not longer than its warm-up ({warmup_s:g} s)"}
    after_warmup, end = statistics.median(warm), statistics.median(tail)
    growth_pct = 100.0 * (end - after_warmup) / after_warmup
    return {"scope": "tritonserver process tree (server + python-backend stubs)", "warmup_s": warmup_s,
            "after_warmup_mb": after_warmup, "end_mb": end, "growth_mb": end - after_warmup,
            "growth_pct": growth_pct, "peak_mb": max(s["total_mb"] for s in samples),
            "max_growth_pct": max_growth_pct, "leak": growth_pct >= max_growth_pct}


def summarize(raw: dict, run_name: str, server: str) -> dict:
    """The soak's verdicts and per-interval table from its raw result."""
    settings = raw["settings"]
    intervals = raw["intervals"]
    memory_rows = memory_per_interval(raw["memory_samples"], settings["interval_s"], len(intervals))
    for row, memory in zip(intervals, memory_rows):
        row["memory_mb"] = memory["by_process"]
        row["memory_total_mb"] = memory["total_mb"]
    totals = {role: {"requests": sum(r["roles"][role]["requests"] for r in intervals),
                     "inferences": sum(r["roles"][role]["inferences"] for r in intervals),
                     "failures": sum(r["roles"][role]["failures"] for r in intervals)} for role in ROLES}
    reasons: Counter = Counter()
    for row in intervals:
        for role in ROLES:
            reasons.update(row["roles"][role]["failures_by_reason"])
    p99 = {}
    for role in ROLES:
        first, last = intervals[0]["roles"][role]["p99_ms"], intervals[-1]["roles"][role]["p99_ms"]
        ratio = last / first if first and last else None
        p99[role] = {"first_ms": first, "last_ms": last, "last_over_first": ratio,
                     "within_limit": ratio is not None and ratio <= settings["max_p99_ratio"]}
    memory = leak_check(raw["memory_samples"], settings["interval_s"], settings["max_growth_pct"])
    requests = sum(t["requests"] for t in totals.values())
    failures = sum(t["failures"] for t in totals.values())
    problems = []
    if failures:
        problems.append(f"{failures} of {requests + failures} requests failed ({dict(reasons)})")
    if memory.get("leak"):
        problems.append(f"server memory grew {memory['growth_pct']:.1f}% after the warm-up "
                        f"(limit {settings['max_growth_pct']:g}%)")
    for role, entry in p99.items():
        if len(intervals) > 1 and not entry["within_limit"]:
            problems.append(f"{role} p99 in the last interval is {entry['last_over_first'] or float('nan'):.2f}x the "
                            f"first (limit {settings['max_p99_ratio']:g}x)")
    if raw["stuck_clients"]:
        problems.append(f"{raw['stuck_clients']} client(s) did not stop")
    return {"run": run_name, "server": server, "minutes": raw["seconds"] / 60.0, "seconds": raw["seconds"],
            "clients": raw["clients"], "protocols": list(settings["protocols"]),
            "batch_sizes": sorted(set(settings["batch_sizes"])), "interval_s": settings["interval_s"],
            "models": raw["models"], "requests": requests, "failures": failures,
            "failures_by_reason": dict(reasons), "totals": totals, "p99": p99, "memory": memory,
            "events": raw["events"], "stuck_clients": raw["stuck_clients"], "intervals": intervals,
            "load_average": raw.get("load_average"), "cpu_cores": os.cpu_count(),
            "problems": problems, "ok": not problems}


# ---- report ------------------------------------------------------------------------------------------
def _ms(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_markdown(summary: dict) -> str:
    memory = summary["memory"]
    lines = [f"# Soak: {summary['run']}", "",
             f"{summary['clients']} clients ({', '.join(summary['protocols'])}; batch sizes "
             f"{', '.join(map(str, summary['batch_sizes']))}) for {summary['minutes']:.1f} min against "
             f"{summary['server']}; rows of {summary['interval_s']:g} s.", "",
             f"**{summary['requests']} requests, {summary['failures']} failed**"
             + (f" ({summary['failures_by_reason']})" if summary["failures"] else "") + ".", ""]
    if "unavailable" in memory:
        lines += [f"Memory: {memory['unavailable']}.", ""]
    else:
        lines += [f"Memory (server + stubs): {memory['after_warmup_mb']:.1f} MB after the warm-up "
                  f"({memory['warmup_s']:g} s), {memory['end_mb']:.1f} MB at the end: growth "
                  f"{memory['growth_pct']:+.2f}% (leak limit {memory['max_growth_pct']:g}%), peak "
                  f"{memory['peak_mb']:.1f} MB.", ""]
    for role, entry in summary["p99"].items():
        ratio = entry["last_over_first"]
        lines.append(f"- {role} p99, last interval over first: {'-' if ratio is None else f'{ratio:.2f}x'}")
    lines.append("")
    processes = sorted({label for row in summary["intervals"] for label in (row.get("memory_mb") or {})})
    header = ["interval", *[f"{role} requests / failed / p50 / p99 ms" for role in ROLES],
              *[f"{label} MB" for label in processes]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["intervals"]:
        cells = [f"{row['start_s']:g}-{row['start_s'] + summary['interval_s']:g} s"]
        for role in ROLES:
            entry = row["roles"][role]
            cells.append(f"{entry['requests']} / {entry['failures']} / {_ms(entry['p50_ms'])} / {_ms(entry['p99_ms'])}")
        for label in processes:
            value = (row.get("memory_mb") or {}).get(label)
            cells.append("-" if value is None else f"{value:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    for event in summary["events"]:
        lines.append(f"\n{event['model']}: stub died at {event['noticed_s']:.1f} s, reloaded and serving again "
                     f"after {event['recovery_s']:.1f} s.")
    load = summary.get("load_average")
    if load:
        lines += ["", f"Machine load average (1 min) at the start {load['start'][0]:.1f}, at the end {load['end'][0]:.1f}, "
                      f"on {summary['cpu_cores']} cores (the soak's own clients included)."]
    lines += ["", "Verdict: " + ("all checks passed." if summary["ok"] else "; ".join(summary["problems"]) + ".")]
    return "\n".join(lines) + "\n"


def plot_memory(raw: dict, path: Path) -> None:
    from polarprune.serving.report import _save, plt  # matplotlib (Agg) only when a report is written
    samples = raw["memory_samples"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = sorted({label for s in samples for label in s["by_process"]})
    for label in labels:
        ax.plot([s["t"] / 60 for s in samples], [s["by_process"].get(label, float("nan")) for s in samples],
                label=label)
    if samples:
        ax.plot([s["t"] / 60 for s in samples], [s["total_mb"] for s in samples], "k--", label="total")
    ax.axvline(raw["settings"]["interval_s"] / 60, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("minutes")
    ax.set_ylabel("resident MB")
    ax.set_title("soak: server and python-backend stub memory (dotted: end of warm-up)")
    ax.legend(fontsize=7)
    _save(fig, path)


def write_soak_report(raw: dict, summary: dict, report_dir: Path) -> None:
    from polarprune.common.atomicio import write_json, write_text
    from polarprune.common.results import provenance
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json(report_dir / "soak.json", {**summary, "provenance": provenance()})
    write_json(report_dir / "soak_raw.json", raw)
    write_text(report_dir / "soak.md", render_markdown(summary))
    plot_memory(raw, report_dir / "soak_memory.png")
