"""Timing for ``spafl-bench``: every candidate timed interleaved with the others (round-robin over repetitions,
medians), so that drift on a shared machine hits them alike (docs/DESIGN.md §5)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}
"""What ``--clock`` names: wall time, or the calling thread's CPU time (``interleaved_samples``)."""


def interleaved_samples(
    steps: dict[str, Callable[[], None]], reps: int, warmup: int = 2, min_sample_s: float = 0.01,
    sync: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """``reps`` samples of seconds per call of each step, timed round-robin so that drift hits all alike.

    A sample runs a step enough times to last about ``min_sample_s`` (counted on the first step), so
    that microsecond layers are not lost in timer and scheduler noise. ``clock``: wall time by default;
    ``time.thread_time`` (the calling thread's CPU time) counts no time the thread waits for a core, so it
    compares candidates on an oversubscribed machine, but only with one torch thread (it misses the others).
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    sync()
    first = next(iter(steps.values()))
    start = clock()
    first()
    sync()
    calls = max(1, math.ceil(min_sample_s / max(clock() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = clock()
            for _ in range(calls):
                step()
            sync()
            samples[name].append((clock() - start) / calls)
    return samples


def time_interleaved(
    steps: dict[str, Callable[[], None]], reps: int, warmup: int = 2, min_sample_s: float = 0.01,
    sync: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict[str, float]]:
    """Seconds per call of each step (``spread``: p20, p50, p80 of ``interleaved_samples``)."""
    samples = interleaved_samples(steps, reps, warmup, min_sample_s, sync, clock)
    return {name: spread(times) for name, times in samples.items()}


def spread(times: Sequence[float]) -> dict[str, float]:
    """``{"p20", "p50", "p80"}`` of ``times`` (seconds): the median is the figure, the 20th and 80th
    percentiles say how far to trust it."""
    if len(times) < 2:
        return dict.fromkeys(("p20", "p50", "p80"), float(times[0]))
    p20, _, _, p80 = statistics.quantiles(times, n=5, method="inclusive")
    return {"p20": p20, "p50": statistics.median(times), "p80": p80}


def medians(timings: dict[str, dict[str, float]]) -> dict[str, float]:
    return {name: t["p50"] for name, t in timings.items()}
