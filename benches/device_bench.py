"""Seconds per image and per step on a GPU machine: tcd-ort's CLI on CUDA (and on the CPU of the
same machine) beside diffusers' PyTorch pipeline with TCDScheduler on CUDA, fp32 and fp16.

Runs where the exporter cannot (no network, no diffusers export toolchain): the tcd-ort model is
a graph-only full-size export whose weights `benches/fill_weights.py` fills with random values,
the diffusers pipeline is `python -m export full` (random weights from the real configs). Both
are full-size SD1.5 (or SDXL) with real shapes; the images are noise, the timings are real.

    python benches/device_bench.py --tcd-ort BIN --model ONNX_DIR --ort-lib DIR \\
        [--family sd15] [--diffusers-dir DIR] [--repeats 3] [--io-binding on|off|both] \\
        [--json OUT.json]

`--io-binding both` times every tcd-ort CUDA configuration with the denoising loop's IoBinding
(the default: conditioning and zero ControlNet residuals placed on the GPU once) and with
`--no-io-binding` (every UNet input copied from the host at every step), alternating the two
in each repeat so drifting clocks affect both alike.

Each tcd-ort run is a fresh process (`--timings` JSON: load, encode, per-step, decode); the
first CUDA run is a warm-up that also fills cuDNN's algorithm cache for the process only, so
every timed run pays its own session start-up in `load`. diffusers is timed in one process after
one warm-up, with `torch.cuda.synchronize()` at every step boundary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import ETA, PROMPT, SEED, SIZES, median, step_median, tcd_ort_command


def run_tcd(args, ep: str, steps: int, guidance: float, tag: str, io_binding: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        timings = pathlib.Path(tmp) / "t.json"
        cmd = tcd_ort_command(args.tcd_ort, args.model, args.family,
                              pathlib.Path(tmp) / "out.png", timings, ep=ep,
                              ort_lib=args.ort_lib, steps=steps, guidance=guidance,
                              extra=() if io_binding else ("--no-io-binding",))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"tcd-ort {tag} failed:\n{proc.stderr}", flush=True)
            return {"tag": tag, "error": proc.stderr.strip()[-2000:]}
        out = json.loads(timings.read_text())
        out.update(tag=tag, ep=ep, steps=steps, guidance=guidance, wall_s=wall,
                   io_binding=io_binding)
        return out


def run_diffusers(args, dtype_name: str, steps: int, guidance: float) -> list[dict]:
    import torch
    from diffusers import AutoPipelineForText2Image, TCDScheduler

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    t0 = time.perf_counter()
    pipe = AutoPipelineForText2Image.from_pretrained(args.diffusers_dir, torch_dtype=dtype)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    torch.cuda.synchronize()
    load = time.perf_counter() - t0
    size = SIZES[args.family]
    runs = []
    for i in range(args.repeats + 1):
        marks: list[float] = []

        def on_step(_pipe, _i, _t, kwargs, marks=marks):
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
            return kwargs

        torch.cuda.synchronize()
        start = time.perf_counter()
        gen = torch.Generator("cpu").manual_seed(SEED)
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, eta=ETA,
             width=size, height=size, generator=gen, callback_on_step_end=on_step)
        torch.cuda.synchronize()
        end = time.perf_counter()
        if i == 0:
            continue  # warm-up
        steps_s = [b - a for a, b in itertools.pairwise(marks)]
        runs.append({
            "tag": f"diffusers {dtype_name} g{guidance}", "load_s": load, "generate_s": end - start,
            "first_step_and_encode_s": marks[0] - start, "steps_s": steps_s,
            "decode_s": end - marks[-1], "steps": steps, "guidance": guidance,
        })
    del pipe
    torch.cuda.empty_cache()
    return runs


def later_step_median(rows: list[dict]) -> float | None:
    """Steps after the first, which also pays allocations, algorithm search and (with
    IoBinding) the one-time uploads."""
    vals = [s for r in rows for s in r.get("steps_s", [])[1:]]
    return statistics.median(vals) if vals else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tcd-ort", required=True)
    p.add_argument("--model", required=True, help="tcd-ort model dir (weights filled)")
    p.add_argument("--ort-lib", required=True, help="onnxruntime-gpu library dir")
    p.add_argument("--family", choices=sorted(SIZES), default="sd15")
    p.add_argument("--diffusers-dir", help="`python -m export full` pipeline; skip if absent")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu", action="store_true", help="also time tcd-ort on this machine's CPU")
    p.add_argument("--io-binding", choices=("on", "off", "both"), default="on",
                   help="tcd-ort with IoBinding (on, the default), with --no-io-binding (off), "
                        "or both for an A/B comparison")
    p.add_argument("--json", type=pathlib.Path)
    args = p.parse_args()

    rows: list[dict] = []
    info = {"machine": platform.node(), "cpus": os.cpu_count()}
    try:
        info["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True).stdout.strip()
    except OSError:
        info["gpu"] = "unknown"
    print(json.dumps(info), flush=True)

    manifest = json.loads((pathlib.Path(args.model) / "tcd_ort.json").read_text())
    dtype = {"float16": "fp16"}.get(manifest.get("dtype", "float32"), "fp32")
    warm = run_tcd(args, "cuda", 1, 0.0, "tcd-ort cuda warm-up")
    print("warm-up:", json.dumps(warm), flush=True)
    groups: dict[str, list[dict]] = {}
    bindings = {"on": [True], "off": [False], "both": [True, False]}[args.io_binding]
    for guidance in (0.0, 2.0):
        tags = {b: f"tcd-ort cuda {dtype} g{guidance}" + ("" if b else " no-iob") for b in bindings}
        for tag in tags.values():
            groups[tag] = []
        for _ in range(args.repeats):
            for b, tag in tags.items():
                groups[tag].append(run_tcd(args, "cuda", 4, guidance, tag, io_binding=b))
        for tag in tags.values():
            print(tag, json.dumps(groups[tag]), flush=True)
    if args.cpu:
        tag = f"tcd-ort cpu {dtype} g0.0"
        groups[tag] = [run_tcd(args, "cpu", 4, 0.0, tag, io_binding=bindings[0])]
        print(tag, json.dumps(groups[tag]), flush=True)
    if args.diffusers_dir:
        for dtype in ("fp32", "fp16"):
            for guidance in (0.0, 2.0):
                try:
                    r = run_diffusers(args, dtype, 4, guidance)
                except Exception as e:  # noqa: BLE001 - report and go on with the table
                    r = [{"tag": f"diffusers {dtype} g{guidance}", "error": repr(e)}]
                groups[f"diffusers {dtype} g{guidance}"] = r
                print(json.dumps(r), flush=True)

    print(f"\n{args.family}, {SIZES[args.family]}x{SIZES[args.family]}, 4 TCD steps, eta 0.3; "
          f"medians of {args.repeats} runs; {info['gpu']}")
    print(f"{'run':35} {'load s':>8} {'encode s':>9} {'step s':>8} {'later s':>8} "
          f"{'decode s':>9} {'generate s':>11} {'wall s':>8}")
    for tag, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            print(f"{tag:35} failed: {rs[0].get('error', '')[:120]}")
            continue

        def fmt(v):
            return f"{v:.3f}" if v is not None else "-"

        enc = median(ok, "encode_s") if "encode_s" in ok[0] else None
        print(f"{tag:35} {fmt(median(ok, 'load_s')):>8} {fmt(enc):>9} {fmt(step_median(ok)):>8} "
              f"{fmt(later_step_median(ok)):>8} "
              f"{fmt(median(ok, 'decode_s')):>9} {fmt(median(ok, 'generate_s')):>11} "
              f"{fmt(median(ok, 'wall_s')):>8}")
        rows.extend(rs)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
