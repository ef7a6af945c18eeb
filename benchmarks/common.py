"""Timing helpers shared by the benchmarks: warm-up, interleaved repeats, medians.

Every timed call ends with `jax.block_until_ready` on its result, so the time is the
device's, not the dispatch's. The machines this runs on are shared and noisy, so
`time_interleaved` runs the candidates round-robin (A B C A B C ...) rather than one
after the other: a burst of load from another process then hits every candidate
about equally, and ratios taken from one call are comparable.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

# The device peaks live in the library (the training loop reports MFU too).
from stabjax.throughput import PEAK_TFLOPS, peak_tflops  # noqa: E402,F401


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds of one candidate: the first call (compile + run) and the timed calls."""

  first_s: float
  times_s: tuple[float, ...]

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s)

  @property
  def min_s(self) -> float:
    return min(self.times_s)


def _call(fn: Callable[[], Any]) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def time_fn(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> Timing:
  """Times `fn()` (a thunk returning arrays): `warmup` untimed calls, then `repeats`."""
  first = _call(fn)
  for _ in range(warmup - 1):
    _call(fn)
  return Timing(first, tuple(_call(fn) for _ in range(repeats)))


def time_interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int = 5,
                     warmup: int = 1, calls: int = 1) -> dict[str, Timing]:
  """Times several thunks round-robin; each sample is the mean of `calls` calls.

  All thunks are first compiled and warmed up (`warmup` calls each, the first one
  timed as `first_s`), then `repeats` rounds run every thunk once per round in the
  given order.
  """
  first = {}
  for name, fn in fns.items():
    first[name] = _call(fn)
    for _ in range(warmup - 1):
      _call(fn)
  samples: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      samples[name].append(sum(_call(fn) for _ in range(calls)) / calls)
  return {name: Timing(first[name], tuple(samples[name])) for name in fns}


def machine_description() -> str:
  """CPU model and core count (from /proc/cpuinfo), or the accelerator, and the date."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    model = platform.processor() or "unknown CPU"
    try:
      with open("/proc/cpuinfo") as f:
        for line in f:
          if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    except OSError:
      pass
    what = f"CPU {model}, {os.cpu_count()} cores"
  else:
    what = f"{jax.device_count()} x {device.device_kind}"
  try:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
  except OSError:
    load = "?"
  date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
  return f"{what}; jax {jax.__version__}; load average at start {load}; {date}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  """A GitHub markdown table; cells are formatted with str()."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)
