"""Decode memory with and without VAE tiling: `tcd-ort decode` (the model's VAE untiled, with
`--vae-tiling`, and with `--tiny-vae` for reference) beside diffusers' AutoencoderKL decode
(untiled and after `enable_tiling()`), on the same random latents at large sizes.

For each size (default 1024 and 2048 pixels: 128^2 and 256^2 latents of SD1.5's full-size VAE,
from a `python -m export convert` of a full-size random pipeline such as `e2e_cpu.py` builds)
this writes seeded standard-normal float32 latents [1, 4, h, w] as .npy and decodes them once per
configuration, each in a fresh process:

* tcd-ort: `tcd-ort decode --model M --latents L.npy --output out.png [--vae-tiling]
  [--tiny-vae DIR]`. The decode command loads the model, checks and releases everything but
  the VAE decoder, prints `loaded ... in Xs`, decodes and prints `decoded N image(s) in Xs`
  (the decode seconds reported here), then writes the PNG;
* diffusers: this script's worker mode in .venv: `AutoencoderKL.from_pretrained(DIR/vae)`, fp32,
  `enable_tiling()` for the tiled run, then `vae.decode(latents / scaling_factor)` under
  `torch.no_grad()`, timed; it prints the same two lines, so both are measured alike.

Memory: `/proc/PID/smaps_rollup` is sampled every --interval seconds (as `rss_trace.py` does);
"RSS at load" is the RSS sampled when the `loaded` line came, "peak after load" the largest
sample after it (the decode and the PNG), "process peak" the kernel's own high-water mark
(`ru_maxrss` from wait4). tcd-ort frees the components it only checked on a thread beside the
decode, in the first second or two after `loaded`, so "after release" is the lowest sample of the
first RELEASE_S seconds after it and "decode's own peak" the largest from there on: what the
decode itself holds (with diffusers, which loads only the VAE, the two agree).

A watchdog kills a process whose RSS passes --limit-gib (default 21 on a 24 GiB machine) and
reports it as killed; an untiled decode whose peak, estimated from the size before it (4x the
decode's growth per 4x pixels, plus what was resident at load), would pass --limit-gib is
skipped and reported as such. The estimate misses what grows faster than the pixels: the VAE
mid-block's attention over all latent pixels, whose score matrix is 65536² floats (16 GiB) at
2048x2048 if the attention kernel holds it whole; the watchdog catches that.

    .venv/bin/python benches/vae_tiling_memory.py --model target/e2e-cpu/sd15/tcd-ort \\
        --diffusers target/e2e-cpu/sd15/diffusers --tiny-vae target/e2e-cpu/sd15/taesd \\
        --sizes 1024 2048 --json tiling.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import ROOT, SEED, cpu_info, load_average

VENV_PY = ROOT / ".venv" / "bin" / "python"
KIB_PER_GIB = 2**20
RELEASE_S = 5.0  # seconds after `loaded` in which tcd-ort frees what it only checked
DECODED = re.compile(r"decoded \d+ image\(s\) in ([0-9.]+)s")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            m = re.search(r"^Rss:\s+(\d+)", f.read(), re.M)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(m.group(1)) if m else None


def measure(cmd: list, interval: float, limit_gib: float, env: dict | None = None) -> dict:
    """Runs `cmd`, sampling its RSS; kills it above `limit_gib`. Returns the decode seconds
    (from stderr), the peaks (GiB), the wall seconds and the exit status."""
    start = time.perf_counter()
    before = load_average()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    lines: list[str] = []
    loaded_at: list[float] = []

    def read_stderr():
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("loaded ") and not loaded_at:
                loaded_at.append(time.perf_counter() - start)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    samples: list[tuple[float, int]] = []
    killed = False
    status = rusage = None
    while True:
        pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            status, rusage = st, ru
            break
        kib = rss_kib(proc.pid)
        if kib is not None:
            samples.append((time.perf_counter() - start, kib))
            if kib > limit_gib * KIB_PER_GIB and not killed:
                log(f"RSS {kib / KIB_PER_GIB:.1f} GiB passed {limit_gib} GiB: killing {proc.pid}")
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
        time.sleep(interval)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    text = "".join(lines)
    m = DECODED.search(text)
    t_loaded = loaded_at[0] if loaded_at else None
    timed = [(t, k) for t, k in samples if t_loaded is not None and t >= t_loaded]
    after = [k for _, k in timed]
    at_load = after[0] if after else None
    # tcd-ort releases the components it only checked on a thread of its own, beside the
    # decode: the RSS falls for a second or two after the `loaded` line. The decode's own peak
    # is the largest sample from the lowest one of those first seconds on.
    early = [i for i, (t, _) in enumerate(timed) if t - t_loaded <= RELEASE_S]
    low = min(early, key=lambda i: after[i]) if early else None
    return {
        "returncode": proc.returncode, "killed_above_limit": killed, "wall_s": wall,
        "decode_s": float(m.group(1)) if m else None, "loaded_at_s": t_loaded,
        "rss_at_load_gib": at_load / KIB_PER_GIB if at_load else None,
        "decode_peak_gib": max(after) / KIB_PER_GIB if after else None,
        "rss_after_release_gib": after[low] / KIB_PER_GIB if low is not None else None,
        "own_decode_peak_gib": max(after[low:]) / KIB_PER_GIB if low is not None else None,
        "process_peak_gib": rusage.ru_maxrss / KIB_PER_GIB,
        "samples": len(samples), "load_before": before, "load_after": load_average(),
        "stderr": text[-2000:],
    }


# ------------------------------------------------------------------------------------------------
# worker: diffusers' AutoencoderKL decode
# ------------------------------------------------------------------------------------------------


def worker_diffusers(vae_dir: str, latents_path: str, tiled: bool) -> None:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    started = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32)
    vae.eval()
    if tiled:
        vae.enable_tiling()
    latents = torch.from_numpy(np.load(latents_path))
    print(f"loaded {vae_dir} in {time.perf_counter() - started:.1f}s", file=sys.stderr,
          flush=True)
    started = time.perf_counter()
    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor).sample
    print(f"decoded {image.shape[0]} image(s) in {time.perf_counter() - started:.2f}s",
          file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=pathlib.Path, help="tcd-ort model directory")
    p.add_argument("--diffusers", type=pathlib.Path,
                   help="the diffusers pipeline it was converted from (its vae/); omit to skip "
                        "diffusers")
    p.add_argument("--tiny-vae", type=pathlib.Path,
                   help="a `python -m export vae-tiny` directory: also decode with it (untiled)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="pixels (square)")
    p.add_argument("--configs", nargs="+",
                   default=["tcd-ort", "tcd-ort --vae-tiling", "tcd-ort --tiny-vae", "diffusers",
                            "diffusers enable_tiling"],
                   help="which decodes to run at each size, in this order")
    p.add_argument("--tcd-ort", type=pathlib.Path, default=ROOT / "target" / "release" / "tcd-ort")
    p.add_argument("--limit-gib", type=float, default=21.0,
                   help="kill a decode above this RSS, skip one estimated above it")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between RSS samples")
    p.add_argument("--json", type=pathlib.Path)
    p.add_argument("--prior", type=pathlib.Path,
                   help="an earlier run's --json: its untiled decodes feed the memory estimate "
                        "(to run the larger sizes on their own)")
    # worker mode (internal)
    p.add_argument("--worker-diffusers", nargs=3, metavar=("VAE_DIR", "LATENTS", "TILED"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_diffusers:
        vae_dir, latents, tiled = args.worker_diffusers
        worker_diffusers(vae_dir, latents, tiled == "1")
        return 0
    if args.model is None:
        p.error("--model is required")

    import numpy as np

    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), **cpu_info(),
            "model": str(args.model), "limit_gib": args.limit_gib}
    log(json.dumps(info))
    results: list[dict] = []
    # The untiled decode's growth per pixel at the last size run, per engine, for the estimate.
    growth: dict[str, tuple[int, dict]] = {}
    if args.prior:
        for r in json.loads(args.prior.read_text())["runs"]:
            if r["config"] in ("tcd-ort", "diffusers") and r.get("returncode") == 0:
                growth[r["config"]] = (r["size"], r)
    with tempfile.TemporaryDirectory(prefix="vae-tiling-") as tmp:
        scratch = pathlib.Path(tmp)
        for size in args.sizes:
            lat = size // 8
            latents = scratch / f"latents-{size}.npy"
            rng = np.random.default_rng(SEED)
            np.save(latents, rng.standard_normal((1, 4, lat, lat), dtype=np.float32))
            for config in args.configs:
                engine = config.split()[0]
                untiled = config in ("tcd-ort", "diffusers")
                row = {"size": size, "latent": lat, "config": config}
                if engine == "diffusers":
                    if args.diffusers is None:
                        continue
                    cmd = [VENV_PY, pathlib.Path(__file__).resolve(), "--worker-diffusers",
                           args.diffusers / "vae", latents, "1" if "tiling" in config else "0"]
                else:
                    if "--tiny-vae" in config and args.tiny_vae is None:
                        continue
                    cmd = [args.tcd_ort, "decode", "--model", args.model, "--latents", latents,
                           "--output", scratch / "out.png", "--overwrite"]
                    if "--vae-tiling" in config:
                        cmd.append("--vae-tiling")
                    if "--tiny-vae" in config:
                        cmd += ["--tiny-vae", args.tiny_vae]
                if untiled and engine in growth:
                    prev_size, prev = growth[engine]
                    scale = (size / prev_size) ** 2
                    base = prev.get("rss_after_release_gib") or prev["rss_at_load_gib"]
                    peak = prev.get("own_decode_peak_gib") or prev["decode_peak_gib"]
                    estimate = base + scale * (peak - base)
                    row["estimated_peak_gib"] = estimate
                    if estimate > args.limit_gib:
                        row["skipped"] = (f"estimated {estimate:.1f} GiB from {prev_size}x"
                                          f"{prev_size} (above {args.limit_gib} GiB)")
                        log(f"{size} {config}: skipped, {row['skipped']}")
                        results.append(row)
                        continue
                log(f"{size}x{size} {config} (load average {load_average()})")
                r = measure(cmd, args.interval, args.limit_gib)
                row.update(r)
                results.append(row)
                if r["returncode"] != 0:
                    log(f"{config} failed ({r['returncode']}):\n{r['stderr']}")
                    continue
                log(f"{config}: decode {r['decode_s']:.2f} s, decode peak "
                    f"{r['decode_peak_gib']:.2f} GiB (at load {r['rss_at_load_gib']:.2f}), "
                    f"process peak {r['process_peak_gib']:.2f} GiB, wall {r['wall_s']:.1f} s")
                if untiled:
                    growth[engine] = (size, r)
                if args.json:  # after every decode, so an interrupted run keeps what it measured
                    args.json.write_text(json.dumps({"info": info, "runs": results}, indent=1))

    print(f"\nVAE decode, 1 image, fp32, CPU; {info['cpu']}, {info['cpus']} CPUs, "
          f"{info['mem_gib']} GiB; {info['date']}; one fresh process each\n")
    print("| size | decode | decode s | RSS at load GiB | after release GiB "
          "| decode's own peak GiB | peak after load GiB | process peak GiB | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")

    def f(v, fmt="{:.2f}"):
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    for r in results:
        name = f"{r['size']}x{r['size']} ({r['latent']}² latents)"
        if "skipped" in r:
            print(f"| {name} | {r['config']} | skipped: {r['skipped']} | | | | | | |")
            continue
        if r.get("killed_above_limit"):
            print(f"| {name} | {r['config']} | killed above {args.limit_gib} GiB | | | | | "
                  f"{f(r['process_peak_gib'])} | {f(r['wall_s'], '{:.1f}')} |")
            continue
        if r["returncode"] != 0:
            print(f"| {name} | {r['config']} | failed ({r['returncode']}) | | | | | | |")
            continue
        print(f"| {name} | {r['config']} | {f(r['decode_s'])} | {f(r['rss_at_load_gib'])} "
              f"| {f(r.get('rss_after_release_gib'))} | {f(r.get('own_decode_peak_gib'))} "
              f"| {f(r['decode_peak_gib'])} | {f(r['process_peak_gib'])} "
              f"| {f(r['wall_s'], '{:.1f}')} |")
    for r in results:
        if "load_before" in r:
            print(f"load average, {r['size']} {r['config']}: {r['load_before']} -> "
                  f"{r['load_after']}")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "runs": results}, indent=1) + "\n")
    return 0 if all(r.get("returncode", 0) == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
