"""Shared pieces of the benchmark scripts (`device_bench.py`, `e2e_cpu.py`): the job every
engine runs, the tcd-ort command line that runs it, medians, and a description of the machine.

Standard library only: the scripts import it from the main environment, the optimum
environment and a bare interpreter alike (`python benches/<script>.py` puts benches/ on the path).
"""

from __future__ import annotations

import os
import pathlib
import platform
import statistics

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The job: TCD's recommended settings, one image at each family's native size.
SIZES = {"sd15": 512, "sdxl": 1024}
PROMPT = "a photo of an astronaut riding a horse on mars"
STEPS = 4
ETA = 0.3
SEED = 0


def tcd_ort_command(
    binary: str | os.PathLike,
    model: str | os.PathLike,
    family: str,
    output: str | os.PathLike,
    timings: str | os.PathLike,
    *,
    ep: str = "cpu",
    ort_lib: str | os.PathLike | None = None,
    steps: int = STEPS,
    guidance: float = 0.0,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """`tcd-ort run` for the job at the family's native size, writing `--timings` JSON."""
    size = str(SIZES[family])
    cmd = [
        str(binary), "run", "--model", str(model), "--prompt", PROMPT,
        "--steps", str(steps), "--eta", str(ETA), "--guidance", str(guidance),
        "--seed", str(SEED), "--width", size, "--height", size, "--ep", ep,
        "--output", str(output), "--timings", str(timings), "--overwrite", "-q",
    ]
    if ort_lib is not None:
        cmd += ["--ort-lib", str(ort_lib)]
    return cmd + list(extra)


def median(rows: list[dict], key: str) -> float | None:
    """Median of `row[key]` over the rows that have a number there."""
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def step_median(rows: list[dict], key: str = "steps_s") -> float | None:
    """Median over every step of every row (`row[key]` is a list of seconds)."""
    vals = [s for r in rows for s in r.get(key, [])]
    return statistics.median(vals) if vals else None


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as /proc/loadavg has them."""
    try:
        return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def cpu_info() -> dict:
    """CPU model, logical CPUs, total memory (GiB) and kernel of this machine."""
    model = platform.processor() or "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "mem_gib": mem_gib,
            "kernel": platform.release(), "machine": platform.node()}
