"""Where a process's memory goes: resident memory over time, split into anonymous and file-backed.

Runs a command (Linux) and samples `/proc/PID/smaps_rollup` every `--interval` seconds: it prints
the peak (total RSS, the anonymous part, the file-backed part: ONNX Runtime's memory-mapped
external data shows up there) and a timeline, one line per `--every` seconds. Peak RSS is what
`/usr/bin/time -v` reports as "Maximum resident set size"; the split says what the peak is made
of.

With `--mmaps MiB` it also runs the command under `strace` with glibc's mmap threshold at 1 MiB,
so that every allocation of 1 MiB or more is a mapping of its own, and lists the anonymous
mappings of at least MiB made between the `--window` seconds (from process start): when each was
made, when it was freed, its size. That is how a buffer held across a whole ONNX Runtime run
shows itself (its lifetime is the run's).

    .venv/bin/python benches/rss_trace.py -- target/release/tcd-ort run --model M ... --low-memory
    .venv/bin/python benches/rss_trace.py --mmaps 4 --window 9 15 -- target/release/tcd-ort run ...
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

GIB = 2**20  # one GiB in kB, the unit smaps reports


def sample(pid: int) -> tuple[int, int] | None:
    """(RSS, anonymous) of `pid` in kB, or None once it has gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rss = re.search(r"^Rss:\s+(\d+)", text, re.M)
    anon = re.search(r"^Anonymous:\s+(\d+)", text, re.M)
    if rss is None or anon is None:
        return None
    return int(rss.group(1)), int(anon.group(1))


def trace_rss(command: list[str], interval: float, every: float) -> int:
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    rows: list[tuple[float, int, int]] = []
    while proc.poll() is None:
        s = sample(proc.pid)
        if s is not None:
            rows.append((time.perf_counter() - start, *s))
        time.sleep(interval)
    if not rows:
        print("no samples: the command ended at once", file=sys.stderr)
        return proc.returncode or 1
    peak = max(rows, key=lambda r: r[1])
    print(f"exit status {proc.returncode}, {len(rows)} samples over {rows[-1][0]:.1f} s")
    print(f"peak RSS {peak[1] / GIB:.2f} GiB at {peak[0]:.1f} s: anonymous {peak[2] / GIB:.2f}, "
          f"file-backed {(peak[1] - peak[2]) / GIB:.2f}")
    print("   t s   RSS GiB  anon GiB  file GiB")
    last = -every
    for t, rss, anon in rows:
        if t - last >= every:
            print(f"{t:6.1f}  {rss / GIB:8.2f}  {anon / GIB:8.2f}  {(rss - anon) / GIB:8.2f}")
            last = t
    return proc.returncode


MMAP = re.compile(
    r"^\d+\s+(\d+\.\d+) mmap\(\S+, (\d+), ([^,]+), ([^,]+), (-?\d+)[^)]*\) = (0x[0-9a-f]+)"
)
MUNMAP = re.compile(r"^\d+\s+(\d+\.\d+) munmap\((0x[0-9a-f]+), (\d+)\)")


def trace_mmaps(command: list[str], min_mib: float, window: tuple[float, float]) -> int:
    if shutil.which("strace") is None:
        print("--mmaps needs strace", file=sys.stderr)
        return 2
    with tempfile.NamedTemporaryFile(suffix=".strace") as log:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
        rc = subprocess.run(["strace", "-f", "-ttt", "-e", "trace=mmap,munmap", "-o", log.name,
                             *command], env=env).returncode
        lines = pathlib.Path(log.name).read_text().splitlines()
    live: dict[int, tuple[float, int]] = {}
    spans: list[tuple[float, float | None, int]] = []
    t0 = None
    for line in lines:
        if m := MMAP.match(line):
            t, size, prot, flags, fd, addr = m.groups()
            t0 = float(t) if t0 is None else t0
            if "MAP_ANONYMOUS" in flags and int(fd) == -1 and "PROT_NONE" not in prot:
                live[int(addr, 16)] = (float(t) - t0, int(size))
        elif (m := MUNMAP.match(line)) and t0 is not None:
            made = live.pop(int(m.group(2), 16), None)
            if made is not None:
                spans.append((made[0], float(m.group(1)) - t0, made[1]))
    spans += [(t, None, size) for t, size in live.values()]
    shown = sorted(s for s in spans if window[0] <= s[0] <= window[1] and s[2] >= min_mib * 2**20)
    print(f"exit status {rc}; anonymous mappings >= {min_mib} MiB "
          f"made in {window[0]}-{window[1]} s:")
    print("  made s  freed s  held s     MiB")
    for made, freed, size in shown:
        held = f"{freed - made:7.2f}" if freed is not None else "   (end)"
        freed_s = f"{freed:7.2f}" if freed is not None else "      -"
        print(f"{made:8.2f}  {freed_s}  {held}  {size / 2**20:6.1f}")
    return rc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interval", type=float, default=0.02, help="seconds between samples")
    p.add_argument("--every", type=float, default=1.0, help="seconds between timeline lines")
    p.add_argument("--mmaps", type=float, metavar="MIB",
                   help="list anonymous mappings of at least MIB under strace instead")
    p.add_argument("--window", type=float, nargs=2, default=(0.0, float("inf")),
                   metavar=("FROM", "TO"), help="with --mmaps: mappings made in this window (s)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given (put it after --)")
    if args.mmaps is not None:
        return trace_mmaps(command, args.mmaps, tuple(args.window))
    return trace_rss(command, args.interval, args.every)


if __name__ == "__main__":
    sys.exit(main())
