"""Benchmark: what LoRA slots cost per denoising step, on a full-size SD1.5 UNet on the CPU.

Exports one random-weight full-size SD1.5 UNet (`export/configs/sd15/unet.json`) twice with
the project's exporter: plain, and with rank-RANK LoRA slots on the TCD target modules
(`export_unet(..., lora_slots=RANK)`, what `convert --lora-slots RANK` writes), then times
one UNet evaluation of each in ONNX Runtime (CPU execution provider, full graph optimisation as
the engine builds its sessions, `--threads` intra-op threads), alternating the two models so
that load from other processes hits both alike. The slots hold zeros here; a filled slot costs
the same (dense kernels, no sparsity shortcuts on the CPU provider).

    .venv/bin/python benches/lora_slot_step.py [--rank 64] [--size 64] [--batch 1] [--runs 5]

`--size` is the latent edge (64 = 512x512 pixels). Needs about 10 GB of free memory for the
export and 7 GB of disk under --workdir (default: a temporary directory under /tmp, removed at
the end).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def export_both(work: pathlib.Path, rank: int) -> tuple[pathlib.Path, pathlib.Path]:
    import torch
    from diffusers import UNet2DConditionModel

    from export.unet import export_unet

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    config = json.loads((ROOT / "export/configs/sd15/unet.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_source")}
    unet = UNet2DConditionModel.from_config(config).eval()
    plain, slotted = work / "plain", work / "slots"
    t = time.perf_counter()
    export_unet(unet, plain, 18)
    log(f"plain export in {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    modules = export_unet(unet, slotted, 18, lora_slots=rank)
    log(f"slot export ({len(modules)} modules, rank {rank}) in {time.perf_counter() - t:.0f} s")
    return plain / "model.onnx", slotted / "model.onnx"


def time_steps(models: dict[str, pathlib.Path], size: int, batch: int, runs: int, threads: int):
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((batch, 4, size, size), dtype=np.float32),
        "timestep": np.full((batch,), 499.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, 768), dtype=np.float32),
    }
    sessions = {}
    for name, path in models.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        t = time.perf_counter()
        sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        log(f"{name}: session in {time.perf_counter() - t:.1f} s")
        sessions[name].run(["out_sample"], feeds)  # warm-up
    times: dict[str, list[float]] = {n: [] for n in models}
    for i in range(runs):
        for name, sess in sessions.items():
            t = time.perf_counter()
            sess.run(["out_sample"], feeds)
            times[name].append(time.perf_counter() - t)
            log(f"run {i}: {name} {times[name][-1]:.3f} s")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--size", type=int, default=64, help="latent edge (64 = 512 px)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", type=pathlib.Path, default=None)
    args = ap.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="tcd-slot-step-", dir=args.workdir or "/tmp"))
    try:
        plain, slotted = export_both(work, args.rank)
        times = time_steps(
            {"plain": plain, f"slots r{args.rank}": slotted},
            args.size,
            args.batch,
            args.runs,
            args.threads,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import onnxruntime

    load = os.getloadavg()
    print(
        f"\nSD1.5 UNet step, CPU, {args.threads} threads, "
        f"latents {args.batch}x4x{args.size}x{args.size}, "
        f"ONNX Runtime {onnxruntime.__version__}, {datetime.date.today().isoformat()}, "
        f"load average {load[0]:.1f} at the end\n"
    )
    print("| model | median | fastest | slowest | runs |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(times["plain"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"| {name} | {med:.3f} s ({med / base:.3f}x) | {min(ts):.3f} s | {max(ts):.3f} s "
            f"| {len(ts)} |"
        )


if __name__ == "__main__":
    main()
