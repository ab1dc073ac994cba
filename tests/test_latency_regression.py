"""Latency regression on a fixed dense/pruned pair (bench/fixture.py), per inference backend.

Only ratios are asserted, never absolute times: the pruned model must realise a set share of the speed-up
its MAC cut promises, and must not fall far below the speed-up recorded in bench/baseline.json. Dense and
pruned are timed interleaved in this process; a noisy machine gets up to ATTEMPTS measurements, shared by
both checks. "cuda" runs the pair on onnxruntime's CUDAExecutionProvider, "tensorrt" as engines built by
the export stage's builder; both skip, with the reason, where the provider, TensorRT or a GPU is absent.
"""
from __future__ import annotations

import pytest

from polarprune.bench import fixture
from polarprune.bench.timing import BackendUnavailable

ATTEMPTS = 3
# speed-up >= 1 + share * (dense MACs / pruned MACs - 1). The CPU is compute-bound at batch 1 already; a GPU
# running this 28x28 ResNet-20 is not, so it is held to a smaller share and only at its large batches
# (fixture.GPU_BATCHES); batch 1 on a GPU measures launches and copies, not MACs.
FLOPS_SHARE = {"cpu": 0.5, "cuda": 0.25, "tensorrt": 0.25}
BASELINE_TOLERANCE = 0.75  # speed-up >= 0.75 * the recorded one
REFRESH = "python -m bench.speedup --baseline-fixture --write-baseline --backend {backend}"

_measured: dict[str, list[dict]] = {}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return fixture.build_fixture(tmp_path_factory.mktemp("latency_fixture"))


def measurements(pair, backend: str):
    """The backend's measurements so far, then fresh ones, ATTEMPTS in all; skips an absent backend."""
    done = _measured.setdefault(backend, [])
    for attempt in range(ATTEMPTS):
        if attempt == len(done):
            try:
                done.append(fixture.measure_fixture(pair, backend))
            except BackendUnavailable as reason:
                pytest.skip(str(reason))
        yield done[attempt]


def first_pass(pair, backend: str, problems_of) -> list[list[str]]:
    """[] as soon as one measurement has no problems, else every attempt's problems."""
    failed = []
    for measured in measurements(pair, backend):
        problems = problems_of(measured)
        if not problems:
            return []
        failed.append(problems)
    return failed


def describe(failed: list[list[str]]) -> str:
    return "\n".join(f"attempt {i + 1}: " + "; ".join(problems) for i, problems in enumerate(failed))


@pytest.mark.parametrize("backend", ["cpu", "cuda", "tensorrt"])
def test_pruned_is_faster_by_a_share_of_its_flops_cut(pair, backend):
    needed = fixture.required_speedup(pair, FLOPS_SHARE[backend])

    def problems_of(measured):
        return [f"batch {batch}: speed-up {r['speedup']:.2f}x < {needed:.2f}x "
                f"(dense {r['dense']['median_ms']:.3f} ms, pruned {r['pruned']['median_ms']:.3f} ms)"
                for batch, r in measured["by_batch"].items() if r["speedup"] < needed]

    failed = first_pass(pair, backend, problems_of)
    assert not failed, (f"pruned model ({pair.pruned_flops / pair.dense_flops:.2f}x MACs) does not realise "
                        f"{FLOPS_SHARE[backend]:.0%} of its ideal speed-up on {backend}:\n{describe(failed)}")


@pytest.mark.parametrize("backend", ["cpu", "cuda", "tensorrt"])
def test_speedup_holds_against_baseline(pair, backend):
    baseline = fixture.load_baseline()
    recorded = {batch: fixture.baseline_speedup(baseline, backend, batch) for batch in fixture.batches_for(backend)}
    if None in recorded.values():
        next(measurements(pair, backend))  # an absent backend skips with its own reason first
        pytest.skip(f"bench/baseline.json has no {backend} entry; record one with: {REFRESH.format(backend=backend)}")

    def problems_of(measured):
        return [f"batch {batch}: speed-up {r['speedup']:.2f}x < {BASELINE_TOLERANCE} x baseline {recorded[batch]:.2f}x"
                for batch, r in measured["by_batch"].items() if r["speedup"] < BASELINE_TOLERANCE * recorded[batch]]

    failed = first_pass(pair, backend, problems_of)
    assert not failed, (f"speed-up regressed on {backend} (refresh the baseline only for an intended change: "
                        f"{REFRESH.format(backend=backend)}):\n{describe(failed)}")


def test_baseline_was_recorded_for_this_fixture(pair):
    baseline = fixture.load_baseline()
    assert baseline, f"{fixture.BASELINE_PATH} is missing; record it with: {REFRESH.format(backend='cpu')}"
    recorded = baseline["fixture"]
    assert recorded["model"] == fixture.MODEL and recorded["input_shape"] == list(fixture.INPUT_SHAPE)
    assert recorded["closed_blocks"] == list(pair.closed_blocks), "the fixture changed: refresh the baseline"
    assert recorded["flops_ratio"] == pytest.approx(pair.pruned_flops / pair.dense_flops)
