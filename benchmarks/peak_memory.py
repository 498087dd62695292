"""Peak resident memory of one measured run, each in a fresh child process (Linux only).

Loading a model has a transient peak of its own, so a child resets the high-water mark (`5` to
/proc/self/clear_refs) after loading and before the run it measures. Children of several variants run
alternately, and the median of each variant's reports is taken, since single runs are noisy.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_in_child(run: Callable[[], object]) -> None:
    """Call `run` with the high-water mark reset and print {"peak_kb", "extra_kb"} as the last line."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = status_kb("VmRSS")
    run()
    peak = status_kb("VmHWM")
    print(json.dumps({"peak_kb": peak, "extra_kb": peak - before}))


def median_child_peaks(commands: dict[str, list[str]], repeats: int) -> dict[str, dict[str, float]]:
    """Run each variant's child command `repeats` times, alternating; the median of each reported field."""
    reports: dict[str, list[dict]] = {k: [] for k in commands}
    for _ in range(repeats):
        for variant, cmd in commands.items():
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            reports[variant].append(json.loads(out))
    return {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in reports.items()}
