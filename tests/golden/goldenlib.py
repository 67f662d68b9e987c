"""What the fixture scripts share: `python -m export` run in the calling process.

Each script starts torch once and runs every export and reference through `export.cli.main`
in-process: a subprocess per command paid the interpreter and the torch/diffusers imports
again (about 5 CPU seconds each, dozens of commands per `make fixtures`). Every command seeds
its own generators, so the files written are the same either way.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))  # the export package


def export_cli(*args) -> float:
    """`python -m export -q ARGS` in this process; returns its seconds, exits on failure."""
    from export.cli import main as export_main

    print("+ python -m export", " ".join(str(a) for a in args), flush=True)
    start = time.perf_counter()
    if export_main(["-q", *map(str, args)]) != 0:
        sys.exit(f"python -m export {args[0]} failed")
    return time.perf_counter() - start
