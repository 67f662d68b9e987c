"""Where a first start's seconds go: one ONNX Runtime session per component of a tcd-ort model
directory, built in a fresh process under each configuration, side by side with diffusers'
`from_pretrained` of the same weights.

```sh
.venv/bin/python benches/load_breakdown.py MODEL_DIR [--diffusers DIR] [--repeats 2] [--cold]
```

The sessions are ONNX Runtime 1.31.1 from the pinned wheel, the library tcd-ort loads, with
tcd-ort's settings (intra-op threads = cores, the CPU arena off). Rows, per component:

- `read`: the graph and its external data read into memory (the disk's share).
- `parse (level disable, no pre-packing)`: the graph and weights placed, nothing optimised.
- `+ pre-packing`: level `disable` with MatMul/Conv weights pre-packed for the CPU kernels.
- `basic`, `extended`, `all`: the optimisation levels (pre-packing on); `all` is tcd-ort's start
  without the session cache.
- `all, graph pre-optimised at basic`: the graph written at level `basic` (the portable level:
  constant folding and eliminations, standard ONNX ops only), loaded at `all`: what an export-time
  optimisation would leave to each start.
- `all + save (cache fill)`: level `all` writing the optimised graph with external data, what
  the session cache's first start costs.
- `cache hit`: the saved `all` graph loaded at level `disable`, the session cache's later starts.

With `--cold` each measurement first evicts the component's files from the page cache
(`posix_fadvise(DONTNEED)`; no privileges needed), as after a reboot or a fresh download.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
CONFIGS = (
    "read",
    "parse",
    "prepack",
    "basic",
    "extended",
    "all",
    "all_from_basic",
    "all_save",
    "hit",
)
LABELS = {
    "read": "read",
    "parse": "parse (level disable, no pre-packing)",
    "prepack": "+ pre-packing (level disable)",
    "basic": "level basic",
    "extended": "level extended",
    "all": "level all (tcd-ort, no cache)",
    "all_from_basic": "level all, graph pre-optimised at basic",
    "all_save": "level all + save (cache fill)",
    "hit": "cache hit (saved `all` graph, level disable)",
}


def component_files(model: pathlib.Path) -> list[pathlib.Path]:
    """The graph and every file beside it that holds its weights."""
    return [p for p in sorted(model.parent.iterdir()) if p.is_file() and p.name.startswith("model")]


def evict(paths: list[pathlib.Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def session_options(level: str, prepack: bool, save: pathlib.Path | None = None):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    o.enable_cpu_mem_arena = False
    o.intra_op_num_threads = os.cpu_count() or 1
    if not prepack:
        o.add_session_config_entry("session.disable_prepacking", "1")
    if save is not None:
        o.optimized_model_filepath = str(save)
        o.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", save.name + ".data"
        )
        # Small tensors stay in the graph, as tcd-ort's cache writes them.
        o.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
    return o


def worker(config: str, model: pathlib.Path, scratch: pathlib.Path, cold: bool) -> float:
    """Seconds of one measurement in this (fresh) process."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if config == "read":
        files = component_files(model)
        if cold:
            evict(files)
        start = time.perf_counter()
        for p in files:
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
        return time.perf_counter() - start
    source = model
    if config == "all_from_basic":
        source = scratch / "basic" / "model.onnx"
    elif config == "hit":
        source = scratch / "all" / "model.onnx"
    if cold:
        evict(component_files(source))
    level, prepack, save = {
        "parse": ("disable", False, None),
        "prepack": ("disable", True, None),
        "basic": ("basic", True, None),
        "extended": ("extended", True, None),
        "all": ("all", True, None),
        "all_from_basic": ("all", True, None),
        "all_save": ("all", True, scratch / "fill" / "model.onnx"),
        "hit": ("disable", True, None),
    }[config]
    if save is not None:
        shutil.rmtree(save.parent, ignore_errors=True)
        save.parent.mkdir(parents=True)
    opts = session_options(level, prepack, save)
    start = time.perf_counter()
    ort.InferenceSession(str(source), opts, providers=providers)
    return time.perf_counter() - start


def prepare(model: pathlib.Path, scratch: pathlib.Path) -> None:
    """The pre-optimised graphs the `all_from_basic` and `hit` rows load."""
    import onnxruntime as ort

    for level in ("basic", "all"):
        out = scratch / level / "model.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        ort.InferenceSession(
            str(model), session_options(level, True, out), providers=["CPUExecutionProvider"]
        )


def diffusers_worker(path: str, cold: bool) -> float:
    import torch
    from diffusers import StableDiffusionPipeline

    if cold:
        evict([p for p in pathlib.Path(path).rglob("*") if p.is_file()])
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    return time.perf_counter() - start


def child(args: list[str]) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model", type=pathlib.Path, nargs="?", help="a tcd-ort model directory")
    p.add_argument("--diffusers", help="the same weights as a diffusers directory")
    p.add_argument("--components", default=",".join(COMPONENTS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cold", action="store_true", help="evict the files from the page cache first")
    p.add_argument("--json", type=pathlib.Path, help="write every measurement here")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "diffusers":
            print(diffusers_worker(rest[0], rest[1] == "1"))
        elif kind == "prepare":
            prepare(pathlib.Path(rest[0]), pathlib.Path(rest[1]))
            print(0.0)
        else:
            print(worker(kind, pathlib.Path(rest[0]), pathlib.Path(rest[1]), rest[2] == "1"))
        return 0
    if args.model is None:
        p.error("MODEL_DIR is required")
    cold = "1" if args.cold else "0"
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tcd-ort-load-") as tmp:
        for name in args.components.split(","):
            model = args.model / name / "model.onnx"
            if not model.is_file():
                raise SystemExit(f"{model}: not found")
            scratch = pathlib.Path(tmp) / name
            child(["prepare", str(model), str(scratch)])
            rows = results.setdefault(name, {c: [] for c in CONFIGS})
            for _ in range(args.repeats):
                # Interleaved: each repeat runs every configuration once, in turn.
                for config in CONFIGS:
                    rows[config].append(child([config, str(model), str(scratch), cold]))
                    print(f"{name} {config}: {rows[config][-1]:.2f} s", file=sys.stderr)
            shutil.rmtree(scratch)
        if args.diffusers:
            results["diffusers"] = {"from_pretrained": []}
            for _ in range(args.repeats):
                results["diffusers"]["from_pretrained"].append(
                    child(["diffusers", args.diffusers, cold])
                )
    med = {
        n: {c: statistics.median(v) for c, v in rows.items() if v} for n, rows in results.items()
    }
    names = [n for n in results if n != "diffusers"]
    print(f"median of {args.repeats} fresh processes, page cache {'cold' if args.cold else 'warm'}")
    print("| configuration | " + " | ".join(f"{n} s" for n in names) + " | total s |")
    print("|---|" + "---:|" * (len(names) + 1))
    for c in CONFIGS:
        vals = [med[n][c] for n in names]
        print(f"| {LABELS[c]} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals):.2f} |")
    if "diffusers" in med:
        print(f"| diffusers from_pretrained (whole pipeline) | | | | "
              f"{med['diffusers']['from_pretrained']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
