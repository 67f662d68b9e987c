"""AnimateDiff on this machine's CPU: tcd-ort's CLI beside diffusers' AnimateDiffPipeline, the
same full-size random-weight SD1.5 and motion adapter, the same job, one run.

The job: full-size SD1.5 (random weights from `export/configs/sd15`, `python -m export full`)
with a full-size random-weight MotionAdapter of the real config of
guoyww/animatediff-motion-adapter-v1-5-2 (block_out_channels 320/640/1280/1280, 2 motion layers
per block, a motion mid block, 8 heads, 32 groups, max sequence length 32), 16 frames at
256x256, 5 TCD steps, guidance 0, eta 0.3, seed 0, fp32, one GIF. Real shapes, so real
timings; the frames are noise. Every run is a fresh process under `/usr/bin/time -v`, timed from
process start to the GIF on disk, engines interleaved (tcd-ort, diffusers, tcd-ort, ...):

* tcd-ort: `tcd-ort run --frames 16 ... --output X.gif --timings T.json` (release build) on the
  export `python -m export animatediff DIFFUSERS_DIR MOTION_DIR OUT_DIR` writes: load, encode,
  steps, decode and the time inside ONNX Runtime's Run per graph (`ort_runs`);
* diffusers: this script's worker mode, `AnimateDiffPipeline(vae, text_encoder, tokenizer,
  unet=UNet2DConditionModel, motion_adapter, scheduler=TCDScheduler)` (diffusers merges the
  adapter into a UNetMotionModel while constructing it, which is part of its load),
  `decode_chunk_size` 16, `export_to_gif`; it times the imports, the load, the pipeline call and
  each call of the text encoder, the UNet and `vae.decode`.

Beside `/usr/bin/time`'s peak RSS, the resident memory of every run is sampled every
`--interval` seconds (`/proc/PID/status`: free to read, unlike rss_trace.py's smaps_rollup,
which walks the page tables), and split by stage: load
(process start to the model loaded), steps (prompt encoding and the UNet steps) and decode (the
VAE decode, the conversion to frames, the GIF). Then tcd-ort runs once more with more frames and
a smaller decode chunk (`--long`, default 32 frames, chunk 8): the decode stage's peak should
follow the chunk, not the frame count, and stay under the UNet stage's.

Also measured in the same run, with e2e_cpu.py's worker: the fp32 GEMM peak (one 2048^3 MatMul
through onnxruntime, best of 10, before and after the engines).

Usage, from the repository root (builds what is missing under --workdir first):

    cargo build --release
    .venv/bin/python benches/animatediff.py --workdir /work/anim-bench --repeats 2 --json a.json
    .venv/bin/python benches/animatediff.py --build-only        # the models alone
    .venv/bin/python benches/animatediff.py --skip-diffusers --long 32:16 --long 48:8

Under WORKDIR: `diffusers/` (`python -m export full --family sd15`, 4.3 GB; with
--diffusers-dir an existing one is used instead), `motion-adapter/` (1.8 GB, this script's
worker), `tcd-ort/` (`python -m export animatediff`). Nothing is deleted unless --clean.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from e2e_cpu import VENV_PY, _timed, log, run_logged, run_worker

from benchlib import ETA, PROMPT, ROOT, SEED, cpu_info, load_average

GIB = 2**20  # one GiB in kB, the unit /proc reports

# guoyww/animatediff-motion-adapter-v1-5-2's config.json (diffusers 0.24 layout).
MOTION_ADAPTER_CONFIG = {
    "block_out_channels": [320, 640, 1280, 1280],
    "motion_layers_per_block": 2,
    "motion_mid_block_layers_per_block": 1,
    "motion_num_attention_heads": 8,
    "motion_norm_num_groups": 32,
    "motion_max_seq_length": 32,
    "use_motion_mid_block": True,
}
STEPS = 5
FRAMES = 16
SIZE = 256
FPS = 8
DECODE_CHUNK = 16  # diffusers' decode_chunk_size default, and tcd-ort's
DEFAULT_DIFFUSERS = pathlib.Path("/work/e2e-bench/sd15/diffusers")


# ------------------------------------------------------------------------------------------------
# worker mode: runs inside .venv
# ------------------------------------------------------------------------------------------------


def worker_motion_adapter(out_dir: str, seed: int) -> None:
    """A MotionAdapter of the real config with random weights, saved with save_pretrained.

    PyTorch's default initialisation (what `from_config` gives the SD1.5 parts too), except that
    any all-zero matrix (diffusers zero-initialises some output projections) gets N(0, 0.02),
    as the tiny models' `_reinit_zeroed` does, so every layer carries signal."""
    import torch
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    adapter = MotionAdapter(**MOTION_ADAPTER_CONFIG)
    generator = torch.Generator().manual_seed(seed + 1)
    zeroed = 0
    with torch.no_grad():
        for _name, p in adapter.named_parameters():
            if p.ndim >= 2 and torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
                zeroed += 1
    params = sum(p.numel() for p in adapter.parameters())
    adapter.save_pretrained(out_dir, safe_serialization=True)
    log(f"motion adapter: {params / 1e6:.1f} M parameters, {zeroed} zero matrices filled")


def worker_diffusers(diffusers_dir: str, motion_dir: str, frames: int, decode_chunk: int,
                     output: str, out_json: str) -> None:
    """Loads AnimateDiffPipeline and runs the job once: phases, per-call times, epoch marks."""
    entered = time.perf_counter()
    marks = {"entered": time.time()}
    calls: dict[str, list[float]] = {}
    starts: dict[str, list[float]] = {}
    import diffusers
    import torch
    import transformers
    from diffusers import (
        AnimateDiffPipeline,
        AutoencoderKL,
        MotionAdapter,
        TCDScheduler,
        UNet2DConditionModel,
    )
    from diffusers.utils import export_to_gif
    from transformers import CLIPTextModel, CLIPTokenizer

    imported = time.perf_counter()
    marks["imported"] = time.time()
    root = pathlib.Path(diffusers_dir)
    dtype = torch.float32
    vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype)
    adapter = MotionAdapter.from_pretrained(motion_dir, torch_dtype=dtype)
    scheduler = TCDScheduler.from_config(TCDScheduler.load_config(root / "scheduler"))
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                               unet=unet, motion_adapter=adapter, scheduler=scheduler)
    del unet, adapter  # the pipeline holds the merged UNetMotionModel
    pipe.set_progress_bar_config(disable=True)

    def timed_with_start(fn, name):
        sink, at = calls.setdefault(name, []), starts.setdefault(name, [])

        def wrapper(*args, **kwargs):
            at.append(time.time())
            return _timed(fn, sink)(*args, **kwargs)

        return wrapper

    pipe.text_encoder.forward = timed_with_start(pipe.text_encoder.forward, "text_encoder")
    pipe.unet.forward = timed_with_start(pipe.unet.forward, "unet")
    pipe.vae.decode = timed_with_start(pipe.vae.decode, "vae_decoder")
    loaded = time.perf_counter()
    marks["loaded"] = time.time()

    generator = torch.Generator("cpu").manual_seed(SEED)
    steps_at: list[float] = []

    def on_step(_pipe, _i, _t, kwargs):
        steps_at.append(time.perf_counter())
        return kwargs

    result = pipe(PROMPT, num_frames=frames, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                  guidance_scale=0.0, eta=ETA, generator=generator, decode_chunk_size=decode_chunk,
                  callback_on_step_end=on_step)
    generated = time.perf_counter()
    marks["generated"] = time.time()
    export_to_gif(result.frames[0], output, fps=FPS)
    saved = time.perf_counter()
    marks["saved"] = time.time()
    marks["decode_start"] = starts.get("vae_decoder", [marks["generated"]])[0]
    pathlib.Path(out_json).write_text(json.dumps({
        "import_s": imported - entered,
        "load_s": loaded - imported,
        "generate_s": generated - loaded,
        "save_s": saved - generated,
        "steps_at_s": [t - loaded for t in steps_at],
        "calls": calls,
        "marks": marks,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------
# building what is missing
# ------------------------------------------------------------------------------------------------


def ensure_models(args) -> dict[str, pathlib.Path]:
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    diffusers_dir = args.diffusers_dir
    if diffusers_dir is None:
        diffusers_dir = work / "diffusers"
        if (not (diffusers_dir / "model_index.json").is_file()
                and (DEFAULT_DIFFUSERS / "model_index.json").is_file()):
            diffusers_dir = DEFAULT_DIFFUSERS
    if not (diffusers_dir / "model_index.json").is_file():
        start = time.perf_counter()
        run_logged([VENV_PY, "-m", "export", "full", "--family", "sd15", diffusers_dir,
                    "--overwrite"])
        log(f"built {diffusers_dir} in {time.perf_counter() - start:.0f} s")
    motion_dir = work / "motion-adapter"
    if not (motion_dir / "diffusion_pytorch_model.safetensors").is_file():
        start = time.perf_counter()
        run_logged([VENV_PY, pathlib.Path(__file__).resolve(), "--worker", "motion-adapter",
                    "--output", motion_dir])
        log(f"built {motion_dir} in {time.perf_counter() - start:.0f} s")
    onnx_dir = work / "tcd-ort"
    if not (onnx_dir / "tcd_ort.json").is_file():
        wait_for_export(args.export_wait)
        start = time.perf_counter()
        run_logged([VENV_PY, "-m", "export", "animatediff", diffusers_dir, motion_dir, onnx_dir])
        log(f"built {onnx_dir} in {time.perf_counter() - start:.0f} s")
    return {"diffusers": diffusers_dir, "motion": motion_dir, "tcd-ort": onnx_dir}


def wait_for_export(wait_s: float) -> None:
    """Waits (up to `wait_s`) until `python -m export animatediff --help` works."""
    deadline = time.monotonic() + wait_s
    while True:
        # An unknown command falls back to `convert` (the default one): look for the usage line.
        proc = subprocess.run([str(VENV_PY), "-m", "export", "animatediff", "--help"], cwd=ROOT,
                              capture_output=True, text=True)
        if proc.returncode == 0 and "export animatediff" in proc.stdout:
            return
        if time.monotonic() >= deadline:
            sys.exit("`python -m export animatediff` is not there (yet)")
        log("waiting for `python -m export animatediff` ...")
        time.sleep(min(60, max(1, deadline - time.monotonic())))


# ------------------------------------------------------------------------------------------------
# timed runs
# ------------------------------------------------------------------------------------------------


def sample(pid: int) -> tuple[int, int] | None:
    """(RSS, anonymous RSS) of `pid` in kB from /proc/PID/status, or None once it has gone.

    The kernel's per-process counters: reading them costs nothing measurable, where
    rss_trace.py's `/proc/PID/smaps_rollup` walks the page tables of the whole process (a
    quarter of a core at 10 Hz on an 11 GiB process, taking its mmap lock each time)."""
    try:
        text = pathlib.Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rss = re.search(r"^VmRSS:\s+(\d+)", text, re.M)
    anon = re.search(r"^RssAnon:\s+(\d+)", text, re.M)
    if rss is None or anon is None:
        return None
    return int(rss.group(1)), int(anon.group(1))


def time_v_traced(cmd: list, interval: float, env: dict | None = None) -> dict:
    """Runs `cmd` under /usr/bin/time -v (wall, peak RSS) and samples the RSS of the command's
    process every `interval` s: `trace` is [(epoch s, RSS GiB, anonymous GiB)]."""
    with (tempfile.NamedTemporaryFile("r", suffix=".time") as report,
          tempfile.TemporaryFile("w+") as stderr):
        before = load_average()
        t0 = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", report.name] + [str(c) for c in cmd],
                                stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT, env=env)
        trace: list[tuple[float, float, float]] = []
        child = None
        while proc.poll() is None:
            if child is None:
                try:
                    kids = pathlib.Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()
                    child = int(kids.split()[0]) if kids.split() else None
                except (OSError, ValueError):
                    child = None
            if child is not None:
                s = sample(child)
                if s is not None:
                    trace.append((time.time(), s[0] / GIB, s[1] / GIB))
            time.sleep(interval)
        wall = time.perf_counter() - start
        stderr.seek(0)
        err = stderr.read()
        text = report.read()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    user = re.search(r"User time \(seconds\): ([\d.]+)", text)
    system = re.search(r"System time \(seconds\): ([\d.]+)", text)
    return {"wall_s": wall, "peak_rss_gib": int(rss.group(1)) / 2**20 if rss else None,
            "user_s": float(user.group(1)) if user else None,
            "system_s": float(system.group(1)) if system else None,
            "returncode": proc.returncode, "stderr": err[-3000:],
            "load_before": before, "load_after": load_average(), "t0": t0, "trace": trace}


def stage_peaks(trace: list, bounds: dict[str, tuple[float, float]]) -> dict:
    """Peak sampled RSS (GiB) and its anonymous part within each stage's [from, to) epoch."""
    out = {}
    for name, (a, b) in bounds.items():
        inside = [s for s in trace if a <= s[0] < b]
        if inside:
            top = max(inside, key=lambda s: s[1])
            out[name] = {"rss_gib": top[1], "anon_gib": top[2], "at_s": top[0] - trace[0][0]}
        if name == "decode" and inside:
            # tcd-ort frees the UNet beside the decode's first chunk: the stage's first samples
            # are the UNet's. "decode_settled" is the peak from the lowest sample of the stage's
            # first quarter on.
            quarter = inside[0][0] + (inside[-1][0] - inside[0][0]) / 4
            first = [i for i, s in enumerate(inside) if s[0] <= quarter]
            low = min(first, key=lambda i: inside[i][1])
            top = max(inside[low:], key=lambda s: s[1])
            out["decode_settled"] = {"rss_gib": top[1], "anon_gib": top[2],
                                     "at_s": top[0] - trace[0][0], "low_gib": inside[low][1]}
    return out


def run_tcd_ort(args, binary, model: pathlib.Path, scratch: pathlib.Path, tag: str,
                frames: int, decode_chunk: int | None, steps: int = STEPS) -> dict:
    gif, timings = scratch / f"tcd-ort-{tag}.gif", scratch / f"tcd-ort-{tag}.json"
    cmd = [binary, "run", "--model", model, "--prompt", PROMPT, "--steps", str(steps),
           "--eta", str(ETA), "--guidance", "0", "--seed", str(SEED), "--frames", str(frames),
           "--width", str(SIZE), "--height", str(SIZE), "--fps", str(FPS), "--ep", "cpu",
           "--output", gif, "--timings", timings, "--overwrite", "-q"]
    if decode_chunk is not None:
        cmd += ["--decode-chunk", str(decode_chunk)]
    if (ROOT / ".ort" / "lib").is_dir():
        cmd += ["--ort-lib", ROOT / ".ort" / "lib"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.second_start:
        cmd += ["--session-cache", scratch / "session-cache"]
    r = time_v_traced(cmd, args.interval)
    name = "tcd-ort" if frames == args.frames and decode_chunk is None else (
        f"tcd-ort, {frames} frames, decode chunk {decode_chunk or DECODE_CHUNK}")
    if r["returncode"] != 0 or not gif.is_file():
        return {"engine": name, "error": r["stderr"], **r}
    t = json.loads(timings.read_text())
    runs = t.get("ort_runs", {})
    unet, vae = runs.get("unet", {}), runs.get("vae_decoder", {})
    # The engine's clock starts with the process: loaded at load_s, decoding from
    # load_s + generate_s - decode_s, both from process start (t0, within milliseconds).
    t0 = r["t0"]
    loaded = t0 + t["load_s"]
    decode_start = loaded + t["generate_s"] - (t.get("decode_s") or 0.0)
    bounds = {"load": (t0, loaded), "steps": (loaded, decode_start),
              "decode": (decode_start, t0 + r["wall_s"] + 1)}
    return {"engine": name, **r, "frames": frames, "decode_chunk": decode_chunk or DECODE_CHUNK,
            "load_s": t["load_s"], "generate_s": t["generate_s"], "encode_s": t["encode_s"],
            "steps_s": t["steps_s"], "decode_s": t["decode_s"], "runtime_s": t.get("ort_run_s"),
            "unet_call_s": unet["seconds"] / unet["calls"] if unet.get("calls") else None,
            "vae_decode_total_s": vae.get("seconds"),
            "calls": {k: {"calls": v["calls"], "seconds": v["seconds"]} for k, v in runs.items()},
            "stages": stage_peaks(r["trace"], bounds), "timings": t}


def run_diffusers(args, models: dict, scratch: pathlib.Path, tag: str) -> dict:
    gif, out = scratch / f"diffusers-{tag}.gif", scratch / f"diffusers-{tag}.json"
    cmd = [VENV_PY, pathlib.Path(__file__).resolve(), "--worker", "diffusers",
           "--model", models["diffusers"], "--motion", models["motion"],
           "--frames", str(args.frames), "--decode-chunk", str(DECODE_CHUNK),
           "--output", gif, "--out-json", out]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    r = time_v_traced(cmd, args.interval, env=env)
    if r["returncode"] != 0 or not out.is_file():
        return {"engine": "diffusers", "error": r["stderr"], **r}
    w = json.loads(out.read_text())
    unet, vae = w["calls"].get("unet", []), w["calls"].get("vae_decoder", [])
    m = w["marks"]
    bounds = {"load": (r["t0"], m["loaded"]), "steps": (m["loaded"], m["decode_start"]),
              "decode": (m["decode_start"], r["t0"] + r["wall_s"] + 1)}
    return {"engine": "diffusers", **r, "frames": args.frames, "decode_chunk": DECODE_CHUNK,
            "import_s": w["import_s"], "load_s": w["load_s"], "generate_s": w["generate_s"],
            "save_s": w["save_s"],
            "steps_s": [b - a for a, b in itertools.pairwise(w["steps_at_s"])],
            "decode_s": m["generated"] - m["decode_start"],
            "runtime_s": sum(sum(v) for v in w["calls"].values()),
            "unet_call_s": sum(unet) / len(unet) if unet else None,
            "vae_decode_total_s": sum(vae) if vae else None,
            "calls": {k: {"calls": len(v), "seconds": sum(v)} for k, v in w["calls"].items()},
            "stages": stage_peaks(r["trace"], bounds), "threads": w["threads"],
            "versions": w["versions"]}


# ------------------------------------------------------------------------------------------------
# the tables
# ------------------------------------------------------------------------------------------------


def summarise(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return None

    def med(vals):
        vals = [v for v in vals if isinstance(v, (int, float))]
        return statistics.median(vals) if vals else None

    s = {k: med([r.get(k) for r in ok]) for k in (
        "wall_s", "load_s", "generate_s", "unet_call_s", "decode_s", "vae_decode_total_s",
        "runtime_s", "peak_rss_gib")}
    s["frames"] = ok[0]["frames"]
    s["decode_chunk"] = ok[0]["decode_chunk"]
    s["per_frame_s"] = s["generate_s"] / s["frames"] if s["generate_s"] else None
    s["step_s"] = med([x for r in ok for x in r.get("steps_s", [])])
    for stage in ("load", "steps", "decode", "decode_settled"):
        s[f"{stage}_peak_gib"] = med([r["stages"].get(stage, {}).get("rss_gib") for r in ok])
    s["runs"] = len(ok)
    s["loads"] = [f"{r['load_before']} -> {r['load_after']}" for r in ok]
    return s


def fmt(v, spec="{:.2f}") -> str:
    return spec.format(v) if isinstance(v, (int, float)) else "-"


def main_table(summary: dict) -> str:
    head = ("| engine | wall s | load s | generate s | per step s (UNet call) | per frame s "
            "| decode s (VAE runs) | peak RSS GiB | tcd-ort / diffusers, wall "
            "| tcd-ort / diffusers, generate | tcd-ort / diffusers, step "
            "| tcd-ort / diffusers, decode | tcd-ort / diffusers, peak |")
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    ref = summary.get("diffusers")
    for engine in ("tcd-ort", "diffusers"):
        s = summary.get(engine)
        if s is None:
            continue

        def ratio(key, s=s, engine=engine):
            if engine == "diffusers":
                return "1"
            if not (ref and ref.get(key) and s.get(key)):
                return "-"
            return f"{s[key] / ref[key]:.2f}"

        lines.append(
            f"| {engine} | {fmt(s['wall_s'], '{:.1f}')} | {fmt(s['load_s'])} "
            f"| {fmt(s['generate_s'])} | {fmt(s['unet_call_s'])} | {fmt(s['per_frame_s'])} "
            f"| {fmt(s['vae_decode_total_s'])} | {fmt(s['peak_rss_gib'])} "
            f"| {ratio('wall_s')} | {ratio('generate_s')} | {ratio('unet_call_s')} "
            f"| {ratio('vae_decode_total_s')} | {ratio('peak_rss_gib')} |")
    return "\n".join(lines)


def memory_table(summary: dict) -> str:
    head = ("| run | frames | decode chunk | peak RSS GiB (time -v) | load stage GiB "
            "| steps stage GiB | decode stage GiB | decode once settled GiB "
            "| that / steps | steps s (median) | decode s |")
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for engine, s in summary.items():
        ratio = (f"{s['decode_settled_peak_gib'] / s['steps_peak_gib']:.2f}"
                 if s.get("decode_settled_peak_gib") and s.get("steps_peak_gib") else "-")
        lines.append(
            f"| {engine} | {s['frames']} | {s['decode_chunk']} | {fmt(s['peak_rss_gib'])} "
            f"| {fmt(s['load_peak_gib'])} | {fmt(s['steps_peak_gib'])} "
            f"| {fmt(s['decode_peak_gib'])} | {fmt(s['decode_settled_peak_gib'])} | {ratio} "
            f"| {fmt(s['step_s'])} "
            f"| {fmt(s['decode_s'])} |")
    return "\n".join(lines)


def parse_long(value: str) -> tuple[int, int]:
    frames, _, chunk = value.partition(":")
    return int(frames), int(chunk or DECODE_CHUNK)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/work/anim-bench"))
    p.add_argument("--diffusers-dir", type=pathlib.Path,
                   help="an existing full-size SD1.5 diffusers pipeline (default: WORKDIR/"
                        f"diffusers, else {DEFAULT_DIFFUSERS} if there, else built)")
    p.add_argument("--repeats", type=int, default=2,
                   help="fresh processes per engine, interleaved")
    p.add_argument("--frames", type=int, default=FRAMES)
    p.add_argument("--long", type=parse_long, action="append", metavar="FRAMES[:CHUNK]",
                   help="an extra tcd-ort run with this many frames and --decode-chunk "
                        "(default 32:8; may repeat; 0 for none)")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--second-start", action="store_true",
                   help="time tcd-ort's second start: every run with --session-cache, filled "
                        "by an untimed short run first (1 step, 8 frames)")
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--export-wait", type=float, default=0,
                   help="seconds to wait for `python -m export animatediff` to exist")
    p.add_argument("--tcd-ort", type=pathlib.Path,
                   default=ROOT / "target" / "release" / "tcd-ort",
                   help="the binary (default target/release/tcd-ort: cargo build --release)")
    p.add_argument("--threads", type=int, help="intra-op threads for both engines")
    p.add_argument("--interval", type=float, default=0.1, help="RSS sampling period, s")
    p.add_argument("--gemm-n", type=int, default=2048)
    p.add_argument("--deadline", type=lambda v: datetime.datetime.fromisoformat(v).timestamp(),
                   help="ISO time (with zone) by which every run must have ended: a run is "
                        "skipped when the last one like it would not fit")
    p.add_argument("--clean", action="store_true",
                   help="delete WORKDIR's motion adapter and tcd-ort export afterwards")
    p.add_argument("--json", type=pathlib.Path)
    # worker mode (internal)
    p.add_argument("--worker", choices=["diffusers", "motion-adapter"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--motion", help=argparse.SUPPRESS)
    p.add_argument("--decode-chunk", type=int, default=DECODE_CHUNK, help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--out-json", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker == "motion-adapter":
        worker_motion_adapter(args.output, SEED)
        return 0
    if args.worker == "diffusers":
        worker_diffusers(args.model, args.motion, args.frames, args.decode_chunk, args.output,
                         args.out_json)
        return 0

    if not shutil.which("/usr/bin/time"):
        sys.exit("/usr/bin/time is needed for peak RSS (Debian: apt-get install time)")
    longs = [x for x in (args.long or [(32, 8)]) if x[0] > 0]
    models = ensure_models(args)
    if args.build_only:
        log(f"models ready: {json.dumps({k: str(v) for k, v in models.items()})}")
        return 0
    binary = args.tcd_ort
    if not binary.is_file():
        sys.exit(f"{binary} is missing: cargo build --release")
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **cpu_info(), "size": SIZE, "frames": args.frames, "steps": STEPS, "eta": ETA,
            "seed": SEED, "guidance": 0.0, "repeats": args.repeats, "threads": args.threads,
            "second_start": args.second_start,
            "long": longs, "motion_adapter": MOTION_ADAPTER_CONFIG,
            "models": {k: str(v) for k, v in models.items()}}
    log(json.dumps(info))
    engines = ["tcd-ort"] + ([] if args.skip_diffusers else ["diffusers"])
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="animatediff-") as tmp:
        scratch = pathlib.Path(tmp)
        gemm_args = ["--gemm-n", str(args.gemm_n)] + (
            ["--threads", str(args.threads)] if args.threads else [])
        gemm = [run_worker("gemm", gemm_args, scratch)]
        log(f"GEMM {args.gemm_n}^3: {gemm[0]['best_gflops']:.0f} GFLOP/s")

        if args.second_start:
            log("tcd-ort: filling the session cache (untimed: 1 step, 8 frames)")
            fill = run_tcd_ort(args, binary, models["tcd-ort"], scratch, "fill", 8, 8, steps=1)
            if "error" in fill:
                log(f"filling the session cache failed:\n{fill['error']}")
                return 1
            log(f"filled in {fill['wall_s']:.1f} s (load {fill['load_s']:.1f} s)")

        def record(r):
            rows.setdefault(r["engine"], []).append(r)
            if "error" in r:
                log(f"{r['engine']} failed:\n{r['error']}")
            else:
                st = r["stages"]
                log(f"{r['engine']}: wall {r['wall_s']:.1f} s, load {r['load_s']:.1f} s, "
                    f"generate {r['generate_s']:.1f} s, peak {r['peak_rss_gib']:.2f} GiB "
                    f"(stages: " + ", ".join(f"{k} {v['rss_gib']:.2f}" for k, v in st.items())
                    + ")")

        took: dict[str, float] = {}

        def fits(key: str, scale: float = 1.0) -> bool:
            """Whether a run like the last `key` one ends before --deadline."""
            if args.deadline is None:
                return True
            left = args.deadline - time.time()
            need = took.get(key, took.get("tcd-ort", 0.0)) * scale
            if need > left:
                log(f"skipping {key}: it took {need:.0f} s, {left:.0f} s left to --deadline")
                return False
            return True

        # Round 1 (each engine), then the longer tcd-ort runs, then the other rounds.
        for i in range(args.repeats):
            for engine in engines:
                if not fits(engine):
                    continue
                log(f"{engine} run {i + 1}/{args.repeats} (load average {load_average()})")
                start = time.time()
                if engine == "tcd-ort":
                    record(run_tcd_ort(args, binary, models["tcd-ort"], scratch, f"{i}",
                                       args.frames, None))
                else:
                    record(run_diffusers(args, models, scratch, f"{i}"))
                took[engine] = time.time() - start
            if i == 0:
                for frames, chunk in longs:
                    if not fits("tcd-ort", frames / args.frames):
                        continue
                    log(f"tcd-ort, {frames} frames, decode chunk {chunk} "
                        f"(load average {load_average()})")
                    record(run_tcd_ort(args, binary, models["tcd-ort"], scratch,
                                       f"{frames}-{chunk}", frames, chunk))
        gemm.append(run_worker("gemm", gemm_args, scratch))
    if args.clean:
        for key in ("motion", "tcd-ort"):
            log(f"removing {models[key]}")
            shutil.rmtree(models[key], ignore_errors=True)

    peak = max(g["best_gflops"] for g in gemm)
    summary = {e: summarise(rs) for e, rs in rows.items()}
    summary = {e: s for e, s in summary.items() if s is not None}
    print(f"\nSD1.5 + motion adapter, {args.frames} frames {SIZE}x{SIZE}, {STEPS} TCD steps, "
          f"guidance 0, eta {ETA}, seed {SEED}, fp32, CPU; {info['cpu']}, {info['cpus']} CPUs, "
          f"{info['mem_gib']} GiB; {info['date']}")
    print(f"medians of {args.repeats} fresh process(es) per engine, interleaved; fp32 GEMM peak "
          f"{peak:.0f} GFLOP/s ({args.gemm_n}^3 MatMul, onnxruntime {gemm[0]['onnxruntime']}, "
          f"before {gemm[0]['best_gflops']:.0f} / after {gemm[1]['best_gflops']:.0f})")
    print("tcd-ort / diffusers below 1: tcd-ort is faster (or lighter)\n")
    print(main_table(summary))
    print()
    print(memory_table(summary))
    print()
    for engine, s in summary.items():
        print(f"load average during {engine}: {'; '.join(s['loads'])}")
    for engine, rs in rows.items():
        for r in rs:
            if "calls" in r:
                parts = ", ".join(f"{k} {v['calls']}x {v['seconds']:.2f} s"
                                  for k, v in r["calls"].items())
                steps = ", ".join(f"{x:.2f}" for x in r.get("steps_s", []))
                extra = (f"; imports {r['import_s']:.2f} s, GIF {r['save_s']:.2f} s"
                         if "import_s" in r else "")
                print(f"{engine}: wall {r['wall_s']:.1f} s, peak {r['peak_rss_gib']:.2f} GiB, "
                      f"user {r['user_s']} s, sys {r['system_s']} s; {parts}; steps [{steps}]"
                      f"{extra}")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "gemm": gemm, "summary": summary,
                                         "runs": rows}, indent=1) + "\n")
    return 0 if all(not any("error" in r for r in rs) for rs in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
