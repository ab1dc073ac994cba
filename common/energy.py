"""Energy of a piece of work: measured where the hardware exposes counters, otherwise estimated.

Sources, in order of preference, per component:
- CPU: RAPL package counters (`/sys/class/powercap/intel-rapl:N/energy_uj`; AMD CPUs on Linux >= 5.8
  expose theirs there too). They measure the whole socket, every process on it included.
- GPU: NVML's total-energy counter (`nvmlDeviceGetTotalEnergyConsumption`, Volta and newer), all GPUs.
- Otherwise an ESTIMATE for the CPU: CPU seconds of the measured processes x an assumed power per busy
  core. The default 4.4 W is 280 W TDP / 64 cores of an AMD EPYC 7763 (AMD's data sheet): a full-load
  per-core share of a server part. Idle power, DRAM, disks and fans are left out, so it is a lower
  bound on what the wall socket sees and is meant for comparing dense against pruned, not for billing.
  Override with POLARPRUNE_WATTS_PER_CORE.

Every reading says which source gave it and, for estimates, the assumptions behind it. Pure standard
library (pynvml optional) so that training and serving can both use it.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

RAPL_ROOT = Path("/sys/class/powercap")
DEFAULT_WATTS_PER_CORE = 4.4
WATTS_ENV = "POLARPRUNE_WATTS_PER_CORE"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def watts_per_core() -> float:
    raw = os.environ.get(WATTS_ENV)
    if raw is None:
        return DEFAULT_WATTS_PER_CORE
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{WATTS_ENV}={raw!r} is not a number of watts") from None
    if not value > 0:
        raise ValueError(f"{WATTS_ENV} must be positive, got {value}")
    return value


# ---- CPU time ----------------------------------------------------------------------------------------
def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its reaped children."""
    self_usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_usage.ru_utime + self_usage.ru_stime + children.ru_utime + children.ru_stime


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one live process from /proc/<pid>/stat (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_tree(root: int) -> list[int]:
    """`root` and all its live descendants (e.g. tritonserver and its python-backend stubs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(text[text.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> float:
    return sum(_proc_cpu_seconds(pid) for pid in process_tree(root))


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (VmRSS), in bytes; 0 for a process that is gone or holds none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_bytes(root: int) -> int:
    """Resident memory of `root` and its descendants (VmRSS), in bytes."""
    return sum(rss_bytes(pid) for pid in process_tree(root))


# ---- hardware counters -------------------------------------------------------------------------------
@dataclass
class RaplZone:
    path: Path
    max_uj: int

    def read_uj(self) -> int:
        return int((self.path / "energy_uj").read_text())


def rapl_zones(root: Path = RAPL_ROOT) -> list[RaplZone]:
    """Readable top-level package zones (intel-rapl:0, intel-rapl:1, ...; subzones like :0:0 would
    double-count). Unreadable counters (root-only since Linux 5.10 on many distributions) are skipped."""
    zones = []
    for path in sorted(root.glob("intel-rapl:*")) if root.is_dir() else []:
        if path.name.count(":") != 1:
            continue
        try:
            zone = RaplZone(path, int((path / "max_energy_range_uj").read_text()))
            zone.read_uj()
        except (OSError, ValueError):
            continue
        zones.append(zone)
    return zones


def _nvml_handles():
    """NVML device handles, or [] without pynvml, a driver or an energy counter."""
    try:
        import pynvml
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        for handle in handles:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises on GPUs without the counter
        return handles
    except Exception:  # noqa: BLE001 - any NVML failure means "no GPU counter", never a crash
        return []


def _nvml_millijoules(handles) -> int:
    import pynvml
    return sum(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in handles)


# ---- the meter ---------------------------------------------------------------------------------------
@dataclass
class EnergyReading:
    joules: float
    seconds: float                  # wall time of the measurement
    cpu_seconds: float              # CPU time of the measured processes
    sources: dict[str, str]         # component -> "rapl" | "nvml" | "estimate"
    component_joules: dict[str, float]
    estimated: bool
    scope: str                      # what the number covers
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __add__(self, other: "EnergyReading") -> "EnergyReading":
        """Sum of two readings (e.g. the epochs of a resumed run); sources and notes are merged."""
        parts = {k: self.component_joules.get(k, 0.0) + other.component_joules.get(k, 0.0)
                 for k in {*self.component_joules, *other.component_joules}}
        return EnergyReading(self.joules + other.joules, self.seconds + other.seconds,
                             self.cpu_seconds + other.cpu_seconds, {**other.sources, **self.sources}, parts,
                             self.estimated or other.estimated,
                             self.scope if other.scope == self.scope else f"{self.scope}, then {other.scope}",
                             sorted(set(self.assumptions) | set(other.assumptions)))

    @classmethod
    def from_dict(cls, data: dict) -> "EnergyReading":
        return cls(**data)


class EnergyMeter:
    """`start()` ... `stop() -> EnergyReading`. `cpu_seconds` says whose CPU time counts (default: this
    process); RAPL and NVML, when readable, replace the CPU estimate and add the GPU."""

    def __init__(self, cpu_seconds: Callable[[], float] = own_cpu_seconds, scope: str = "this process",
                 rapl_root: Path = RAPL_ROOT, use_nvml: bool = True):
        self._cpu_seconds, self.scope = cpu_seconds, scope
        self._zones = rapl_zones(rapl_root)
        self._gpus = _nvml_handles() if use_nvml else []
        self._start: tuple | None = None

    def _sample(self) -> tuple:
        return (time.perf_counter(), self._cpu_seconds(), [z.read_uj() for z in self._zones],
                _nvml_millijoules(self._gpus) if self._gpus else 0)

    def start(self) -> "EnergyMeter":
        self._start = self._sample()
        return self

    def stop(self) -> EnergyReading:
        if self._start is None:
            raise RuntimeError("EnergyMeter.stop() before start()")
        (t0, cpu0, rapl0, gpu0), (t1, cpu1, rapl1, gpu1) = self._start, self._sample()
        self._start = None
        cpu = cpu1 - cpu0
        joules, sources, notes = {}, {}, []
        if self._zones:
            # A counter wraps at max_energy_range_uj; one wrap per reading interval at most.
            delta = sum((after - before) % (zone.max_uj + 1)
                        for zone, before, after in zip(self._zones, rapl0, rapl1))
            joules["cpu"], sources["cpu"] = delta / 1e6, "rapl"
            notes.append("RAPL measures whole CPU packages: every process on them is included")
        else:
            watts = watts_per_core()
            joules["cpu"], sources["cpu"] = cpu * watts, "estimate"
            notes.append(f"estimate: {watts:g} W per busy core x CPU seconds of {self.scope} "
                         f"({WATTS_ENV} overrides; default = 280 W TDP / 64 cores, AMD EPYC 7763); "
                         "idle power, DRAM and other parts excluded")
        if self._gpus:
            joules["gpu"], sources["gpu"] = (gpu1 - gpu0) / 1e3, "nvml"
        return EnergyReading(sum(joules.values()), t1 - t0, cpu, sources, joules,
                             any(s == "estimate" for s in sources.values()), self.scope, notes)
