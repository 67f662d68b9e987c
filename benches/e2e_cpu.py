"""End to end on this machine's CPU: tcd-ort's CLI beside diffusers' PyTorch pipeline and
optimum's ORTStableDiffusionPipeline, the same full-size random-weight model, the same job.

The job: full-size SD1.5 (or SDXL) with random weights from the real configs (real shapes, so
real timings; the images are noise), 4 TCD steps, guidance 0, eta 0.3, fixed seed, fp32, one
image at 512x512 (SDXL: 1024x1024). Every run is a fresh process under `/usr/bin/time -v`, timed
from process start to the PNG on disk:

* tcd-ort: `tcd-ort run ... --timings T.json` (release build): load, encode, steps, decode and
  the time spent inside ONNX Runtime's Run per graph (`ort_runs`);
* diffusers: `StableDiffusion(XL)Pipeline` with `TCDScheduler`, in the main environment
  (.venv), the model `python -m export full` wrote;
* optimum: `ORTStableDiffusion(XL)Pipeline` with `TCDScheduler`, in its own environment
  (.venv-optimum), on `optimum-cli export onnx` of that same diffusers directory (the export
  `tests/golden/make_optimum.py` makes for the fixtures).

With --tcd-ort-optimum-graphs tcd-ort also runs optimum's export (it loads optimum's layout
as-is): the same engine on the other exporter's graphs, which tells a difference of graphs from
one of engines. --tcd-ort-plain-attention also runs an export with `--attention plain` (the
exporter's MatMul/Softmax/MatMul instead of ONNX Runtime's MultiHeadAttention),
--tcd-ort-low-memory the default export with `--low-memory`, --tcd-ort-fp16 an export with
`--dtype fp16` (float16 weights, cast to float32 in every step on the CPU: a different
precision from the other engines' float32 runs), and --tcd-ort-keep-loaded with
`--keep-loaded` (every component held to the end and the CPU arena off, as a long-lived engine
holds them; the default releases each component after its stage and uses the arena).

With --tiny-vae the job also runs with a tiny autoencoder in place of the model's VAE, in both
engines: a random-weight TAESD (diffusers' `AutoencoderTiny()` with its default config, which is
madebyollin/taesd's architecture; seeded weights scaled as `export/vae_tiny.py` scales the tiny
fixture's, so images and latents are not degenerate), saved under WORKDIR/<family>/taesd-diffusers
and exported with `python -m export vae-tiny` to taesd/. tcd-ort runs `run --tiny-vae taesd/`,
diffusers sets `pipe.vae = AutoencoderTiny.from_pretrained(taesd-diffusers/)`; each is compared
with tcd-ort on the same VAE (the ratio columns), and the VAE GFLOP/s of those rows count the
TAESD decoder's FLOPs. --skip-diffusers then skips only diffusers with the model's VAE.

The Python runs are this script's own worker mode, run by the environment's interpreter: it
times the imports, `from_pretrained` (load), the pipeline call (generate) and saving the PNG, and
each call of the text encoder(s), the UNet and the VAE decoder (PyTorch modules in diffusers,
`InferenceSession.run` per graph in optimum). Σ runtime is the time inside those calls (ONNX
Runtime's Run for tcd-ort and optimum, the PyTorch modules for diffusers), so
wall - load - Σ runtime is what each engine spends elsewhere: process start and imports,
tokenising, scheduling, tensor conversions, image encoding.

Also measured in the same run: the fp32 GEMM peak (one 2048^3 MatMul through the onnxruntime of
.venv, all cores, best of several, before and after the engines) and the FLOPs of one UNet step
and one VAE decode at the job's size (torch's FlopCounterMode on the meta device; 2 FLOPs per
multiply-add), from which the achieved GFLOP/s of each engine's UNet step and VAE decode follow.

Usage, from the repository root:

    .venv/bin/python benches/e2e_cpu.py --family sd15 --workdir /var/tmp/e2e  # build, run, delete
    .venv/bin/python benches/e2e_cpu.py --repeats 3 --keep     # keep the models for a later run
    .venv/bin/python benches/e2e_cpu.py --skip-optimum --json out.json
    .venv/bin/python benches/e2e_cpu.py --repeats 3 --second-start  # from tcd-ort's session cache

What is missing under WORKDIR/<family>/ is built first: `diffusers/` (`python -m export full`),
`tcd-ort/` (`python -m export convert`), `optimum/` (optimum-cli), and target/release/tcd-ort
(`cargo build --release`) unless --tcd-ort names a binary. The models are deleted at the end
unless --keep (or they were there before the run). Disk: SD1.5 about 13 GB (4.3 GB per model,
plus a 4.3 GB scratch copy while optimum exports), SDXL about 3x that; memory: the largest
process peaks near 8.5 GiB for SD1.5 (optimum), SDXL needs well over 24 GiB for the exports.
The runs go one after another (tcd-ort, diffusers, optimum per repeat) and the load average is
recorded beside each, since a shared machine moves every number.
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

from benchlib import ETA, PROMPT, ROOT, SEED, SIZES, STEPS, cpu_info, load_average, tcd_ort_command

VENV_PY = ROOT / ".venv" / "bin" / "python"
OPTIMUM_PY = ROOT / ".venv-optimum" / "bin" / "python"
PIPELINES = {
    "diffusers": {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"},
    "optimum": {"sd15": "ORTStableDiffusionPipeline", "sdxl": "ORTStableDiffusionXLPipeline"},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# worker mode: runs inside .venv (diffusers, gemm, flops) or .venv-optimum (optimum)
# ------------------------------------------------------------------------------------------------


def _timed(fn, sink: list[float]):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - start)

    return wrapper


def worker_pipeline(engine: str, family: str, model: str, output: str, out_json: str,
                    tiny_vae: str | None = None) -> None:
    """Loads and runs one pipeline once, writing the phases and per-call times as JSON; with
    `tiny_vae` (diffusers only) `pipe.vae` is that AutoencoderTiny directory, loaded as part of
    the load."""
    entered = time.perf_counter()
    calls: dict[str, list[float]] = {}
    import torch  # timed as part of the imports

    if engine == "optimum":
        import onnxruntime as ort
        from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession

        # Every graph runs through InferenceSession.run (or run_with_iobinding): time those
        # calls per model file, as tcd-ort's `ort_runs` does.
        def patch(name):
            original = getattr(InferenceSession, name)

            def run(self, *args, **kwargs):
                component = pathlib.Path(getattr(self, "_model_path", "") or "?").parent.name
                sink = calls.setdefault(component, [])
                return _timed(original, sink)(self, *args, **kwargs)

            setattr(InferenceSession, name, run)

        patch("run")
        patch("run_with_iobinding")
        import optimum.onnxruntime as pipelines
        from diffusers import TCDScheduler

        versions = {"onnxruntime": ort.__version__}
    else:
        import diffusers as pipelines
        from diffusers import TCDScheduler

        versions = {}
    import diffusers
    import transformers

    versions.update(torch=torch.__version__, diffusers=diffusers.__version__,
                    transformers=transformers.__version__)
    if engine == "optimum":
        import optimum.onnxruntime

        versions["optimum-onnx"] = getattr(optimum.onnxruntime, "__version__", None) or _dist(
            "optimum-onnx")
    imported = time.perf_counter()

    cls = getattr(pipelines, PIPELINES[engine][family])
    if engine == "optimum":
        pipe = cls.from_pretrained(model)
    else:
        pipe = cls.from_pretrained(model, torch_dtype=torch.float32)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if tiny_vae:
        from diffusers import AutoencoderTiny

        pipe.vae = AutoencoderTiny.from_pretrained(tiny_vae, torch_dtype=torch.float32)
    if engine == "diffusers":
        for name in ("text_encoder", "text_encoder_2", "unet"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.forward = _timed(module.forward, calls.setdefault(name, []))
        pipe.vae.decode = _timed(pipe.vae.decode, calls.setdefault("vae_decoder", []))
    loaded = time.perf_counter()

    size = SIZES[family]
    generator = torch.Generator("cpu").manual_seed(SEED)
    steps_at: list[float] = []

    def on_step(_pipe, _i, _t, kwargs):
        steps_at.append(time.perf_counter())
        return kwargs

    image = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=0.0, eta=ETA, width=size,
                 height=size, generator=generator, callback_on_step_end=on_step).images[0]
    generated = time.perf_counter()
    image.save(output)
    saved = time.perf_counter()
    result = {
        "import_s": imported - entered,
        "load_s": loaded - imported,
        "generate_s": generated - loaded,
        "save_s": saved - generated,
        "steps_at_s": [t - loaded for t in steps_at],
        "calls": calls,
        "threads": torch.get_num_threads(),
        "versions": versions,
    }
    pathlib.Path(out_json).write_text(json.dumps(result, indent=1) + "\n")


def _dist(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def worker_gemm(n: int, repeats: int, threads: int | None, out_json: str) -> None:
    """fp32 GEMM peak through ONNX Runtime: one n x n x n MatMul, best of `repeats`, on
    `threads` intra-op threads (default ONNX Runtime's: one per physical core)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32),
             "b": rng.standard_normal((n, n), dtype=np.float32)}
    for _ in range(2):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    flops = 2.0 * n**3
    pathlib.Path(out_json).write_text(json.dumps({
        "n": n, "times_s": times, "best_gflops": flops / min(times) / 1e9,
        "median_gflops": flops / statistics.median(times) / 1e9, "onnxruntime": ort.__version__,
        "onnx": onnx.__version__}, indent=1) + "\n")


def worker_flops(family: str, diffusers_dir: str, out_json: str, tiny_vae: str | None) -> None:
    """FLOPs of one UNet evaluation (batch 1, no CFG) and one VAE decode at the job's size (and
    one decode of the `tiny_vae` AutoencoderTiny), counted by torch on the meta device (no
    weights, no arithmetic)."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    root = pathlib.Path(diffusers_dir)
    latent = SIZES[family] // 8
    with torch.device("meta"), torch.no_grad():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        cfg = unet.config
        sample = torch.randn(1, cfg.in_channels, latent, latent)
        text = torch.randn(1, 77, cfg.cross_attention_dim)
        extra = {}
        if cfg.addition_embed_type == "text_time":
            time_ids = 6
            pooled = (cfg.projection_class_embeddings_input_dim
                      - time_ids * cfg.addition_time_embed_dim)
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled),
                                          "time_ids": torch.randn(1, time_ids)}
        counter = FlopCounterMode(display=False)
        with counter:
            unet(sample, torch.tensor([999]), text, **extra)
        unet_flops = counter.get_total_flops()
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        counter = FlopCounterMode(display=False)
        with counter:
            vae.decode(torch.randn(1, vae.config.latent_channels, latent, latent))
        vae_flops = counter.get_total_flops()
        tiny_flops = None
        if tiny_vae:
            tiny = AutoencoderTiny.from_config(AutoencoderTiny.load_config(tiny_vae))
            counter = FlopCounterMode(display=False)
            with counter:
                tiny.decode(torch.randn(1, tiny.config.latent_channels, latent, latent))
            tiny_flops = counter.get_total_flops()
    pathlib.Path(out_json).write_text(json.dumps(
        {"unet_step_flops": unet_flops, "vae_decode_flops": vae_flops,
         "vae_tiny_decode_flops": tiny_flops, "latent": [latent, latent]}, indent=1) + "\n")


def worker_taesd(out_dir: str, seed: int) -> None:
    """A full-size random-weight TAESD: `AutoencoderTiny()` with diffusers' default config
    (madebyollin/taesd's: 64-wide blocks, 1/3/3/3 encoder and 3/3/3/1 decoder blocks, 4 latent
    channels, scaling factor 1.0), weights seeded and scaled as the tiny fixture's
    (`export.vae_tiny._randomise`), saved with `save_pretrained`."""
    import torch
    from diffusers import AutoencoderTiny

    sys.path.insert(0, str(ROOT))
    from export.vae_tiny import _randomise

    torch.manual_seed(seed)
    vae = AutoencoderTiny()
    _randomise(vae, seed)
    vae.save_pretrained(out_dir, safe_serialization=True)


# ------------------------------------------------------------------------------------------------
# building what is missing
# ------------------------------------------------------------------------------------------------


def run_logged(cmd: list, **kwargs) -> None:
    log("+ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kwargs)


def ensure_models(args, base: pathlib.Path) -> list[pathlib.Path]:
    """Builds the missing model directories; returns the ones this run created."""
    created = []
    diffusers_dir, onnx_dir, optimum_dir = (base / "diffusers", base / "tcd-ort",
                                            base / "optimum")
    # The diffusers pipeline is the source of the other two and of the FLOP count: always built.
    if not (diffusers_dir / "model_index.json").is_file():
        start = time.perf_counter()
        run_logged([VENV_PY, "-m", "export", "full", "--family", args.family, diffusers_dir,
                    "--overwrite"])
        log(f"built {diffusers_dir} in {time.perf_counter() - start:.0f} s")
        created.append(diffusers_dir)
    # tcd-ort's exports: the default one always, the variants asked for.
    exports = ((True, onnx_dir, ()),
               (args.tcd_ort_fp16, base / "tcd-ort-fp16", ("--dtype", "fp16")),
               (args.tcd_ort_plain_attention, base / "tcd-ort-plain", ("--attention", "plain")))
    for wanted, out_dir, flags in exports:
        if wanted and not (out_dir / "tcd_ort.json").is_file():
            start = time.perf_counter()
            run_logged([VENV_PY, "-m", "export", "convert", diffusers_dir, out_dir, "--overwrite",
                        *flags])
            log(f"built {out_dir} in {time.perf_counter() - start:.0f} s")
            created.append(out_dir)
        elif wanted and "segments" not in json.loads(
                (out_dir / "tcd_ort.json").read_text()).get("components", {}).get("unet", {}):
            # A directory kept from before `convert` wrote the UNet's segments (--low-memory).
            run_logged([VENV_PY, "-m", "export", "segment", out_dir])
    if args.tiny_vae and not (base / "taesd" / "tcd_ort.json").is_file():
        taesd_src = base / "taesd-diffusers"
        if not (taesd_src / "config.json").is_file():
            run_logged([VENV_PY, pathlib.Path(__file__).resolve(), "--worker", "taesd",
                        "--model", taesd_src])
            created.append(taesd_src)
        run_logged([VENV_PY, "-m", "export", "vae-tiny", taesd_src, base / "taesd", "--overwrite"])
        created.append(base / "taesd")
    if not args.skip_optimum and not (optimum_dir / "model_index.json").is_file():
        # The fixtures' optimum export, on this pipeline: plain optimum-cli on a copy whose
        # CLIPTextModel weights carry the prefix transformers 4 expects.
        start = time.perf_counter()
        code = ("import pathlib, sys; sys.path.insert(0, 'tests/golden'); import make_optimum; "
                f"make_optimum.export(pathlib.Path({str(diffusers_dir)!r}), "
                f"pathlib.Path({str(optimum_dir)!r}))")
        env = dict(os.environ, TMPDIR=str(base))  # the scratch copy next to the models
        run_logged([OPTIMUM_PY, "-c", code], env=env)
        log(f"built {optimum_dir} in {time.perf_counter() - start:.0f} s")
        created.append(optimum_dir)
    return created


def ensure_binary(args) -> pathlib.Path:
    if args.tcd_ort:
        return pathlib.Path(args.tcd_ort)
    binary = ROOT / "target" / "release" / "tcd-ort"
    run_logged(["cargo", "build", "--release", "--bin", "tcd-ort"])
    return binary


# ------------------------------------------------------------------------------------------------
# timed runs
# ------------------------------------------------------------------------------------------------


def time_v(cmd: list, env: dict | None = None) -> dict:
    """Runs `cmd` under /usr/bin/time -v: wall seconds, peak RSS (GiB), exit status, stderr."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        before = load_average()
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", "-o", report.name] + [str(c) for c in cmd],
                              capture_output=True, text=True, cwd=ROOT, env=env)
        wall = time.perf_counter() - start
        text = report.read()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"wall_s": wall, "peak_rss_gib": int(rss.group(1)) / 2**20 if rss else None,
            "returncode": proc.returncode, "stderr": proc.stderr[-3000:],
            "load_before": before, "load_after": load_average()}


def run_tcd_ort(args, binary, model: pathlib.Path, scratch: pathlib.Path, i,
                flags: tuple = ()) -> dict:
    png, timings = scratch / f"tcd-ort-{model.name}-{i}.png", scratch / f"tcd-ort-{i}.json"
    extra = tuple(flags) + (("--threads", str(args.threads)) if args.threads else ())
    if args.second_start:
        extra += ("--session-cache", str(scratch / "session-cache"))
    cmd = tcd_ort_command(binary, model, args.family, png, timings,
                          ort_lib=ROOT / ".ort" / "lib", extra=extra)
    r = time_v(cmd)
    if r["returncode"] != 0 or not png.is_file():
        return {"engine": f"tcd-ort ({model.name})", "error": r["stderr"], **r}
    t = json.loads(timings.read_text())
    runs = t.get("ort_runs", {})
    calls = {name: {"calls": v["calls"], "seconds": v["seconds"]} for name, v in runs.items()}
    unet = runs.get("unet", {})
    vae = runs.get("vae_decoder") or next(
        (v for k, v in runs.items() if "decoder" in k and "vae" in k), {})
    return {"engine": f"tcd-ort ({model.name})", **r, "load_s": t["load_s"],
            "generate_s": t["generate_s"], "encode_s": t["encode_s"], "steps_s": t["steps_s"],
            "decode_s": t["decode_s"],
            "runtime_s": t.get("ort_run_s"),
            "unet_step_s": unet["seconds"] / unet["calls"] if unet.get("calls") else None,
            "vae_decode_s": vae["seconds"] / vae["calls"] if vae.get("calls") else None,
            "calls": calls}


def run_python(args, engine: str, base: pathlib.Path, scratch: pathlib.Path, i: int) -> dict:
    tiny = engine.endswith("--tiny-vae")
    kind = engine.split()[0]
    png = scratch / f"{kind}{'-tiny' if tiny else ''}-{i}.png"
    out = png.with_suffix(".json")
    python = OPTIMUM_PY if kind == "optimum" else VENV_PY
    model = base / ("optimum" if kind == "optimum" else "diffusers")
    cmd = [python, pathlib.Path(__file__).resolve(), "--worker", kind, "--family", args.family,
           "--model", model, "--output", png, "--out-json", out]
    if tiny:
        cmd += ["--tiny-vae-dir", base / "taesd-diffusers"]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    r = time_v(cmd, env=env)
    if r["returncode"] != 0 or not out.is_file():
        return {"engine": engine, "error": r["stderr"], **r}
    w = json.loads(out.read_text())
    calls = {k: {"calls": len(v), "seconds": sum(v)} for k, v in w["calls"].items()}
    unet, vae = w["calls"].get("unet", []), w["calls"].get("vae_decoder", [])
    at = w["steps_at_s"]
    return {"engine": engine, **r, "import_s": w["import_s"], "load_s": w["load_s"],
            "generate_s": w["generate_s"], "save_s": w["save_s"],
            "steps_s": [b - a for a, b in itertools.pairwise(at)],
            "runtime_s": sum(c["seconds"] for c in calls.values()),
            # Means over the calls, as tcd-ort's `ort_runs` give them.
            "unet_step_s": sum(unet) / len(unet) if unet else None,
            "vae_decode_s": sum(vae) / len(vae) if vae else None,
            "calls": calls, "threads": w["threads"], "versions": w["versions"]}


def run_worker(kind: str, extra: list, scratch: pathlib.Path) -> dict:
    out = scratch / f"{kind}.json"
    cmd = [VENV_PY, pathlib.Path(__file__).resolve(), "--worker", kind, "--out-json", out] + extra
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------


def summarise(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return None

    def med(key):
        vals = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        return statistics.median(vals) if vals else None

    s = {k: med(k) for k in ("wall_s", "load_s", "generate_s", "unet_step_s", "vae_decode_s",
                             "runtime_s", "peak_rss_gib")}
    s["overhead_s"] = med_of([r["wall_s"] - r["load_s"] - r["runtime_s"] for r in ok])
    s["runs"] = len(ok)
    s["loads"] = [f"{r['load_before']} -> {r['load_after']}" for r in ok]
    return s


def med_of(vals: list[float]) -> float | None:
    return statistics.median(vals) if vals else None


def table(summary: dict, flops: dict, peak: float) -> str:
    def f(v, fmt="{:.2f}"):
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    head = ("| engine | wall s | load s | generate s | UNet step s | VAE decode s | peak RSS GiB "
            "| Σ runtime s | wall − load − Σ runtime s | tcd-ort / engine, wall "
            "| tcd-ort / engine, generate | UNet GFLOP/s (% of GEMM peak) "
            "| VAE GFLOP/s (% of peak) |")
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for engine in summary:
        s = summary.get(engine)
        if s is None:
            continue
        # Each row against tcd-ort on the same VAE (the model's, or the tiny one).
        tiny = engine.endswith("--tiny-vae")
        ref = "tcd-ort --tiny-vae" if tiny else "tcd-ort"
        tcd = summary.get(ref)
        vae_flops = flops["vae_tiny_decode_flops"] if tiny else flops["vae_decode_flops"]

        def ratio(key, s=s, tcd=tcd):
            if tcd and s.get(key) and tcd.get(key):
                return f"{tcd[key] / s[key]:.2f}"
            return "-"

        def rate(flop, secs):
            if not secs:
                return "-"
            g = flop / secs / 1e9
            return f"{g:.0f} ({100 * g / peak:.0f}%)"

        lines.append(
            f"| {engine} | {f(s['wall_s'], '{:.1f}')} | {f(s['load_s'])} | {f(s['generate_s'])} "
            f"| {f(s['unet_step_s'])} | {f(s['vae_decode_s'])} | {f(s['peak_rss_gib'])} "
            f"| {f(s['runtime_s'])} | {f(s['overhead_s'])} "
            f"| {'1' if engine == ref else ratio('wall_s')} "
            f"| {'1' if engine == ref else ratio('generate_s')} "
            f"| {rate(flops['unet_step_flops'], s['unet_step_s'])} "
            f"| {rate(vae_flops, s['vae_decode_s'])} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(SIZES), default="sd15")
    p.add_argument("--workdir", type=pathlib.Path, default=ROOT / "target" / "e2e-cpu",
                   help="where the models are built (default target/e2e-cpu)")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per engine")
    p.add_argument("--keep", action="store_true", help="keep the models this run built")
    p.add_argument("--build-only", action="store_true",
                   help="build what is missing under --workdir and stop (keeps the models)")
    p.add_argument("--skip-optimum", action="store_true")
    p.add_argument("--tcd-ort-optimum-graphs", action="store_true",
                   help="also run tcd-ort on optimum's export (which it loads as-is): the same "
                        "engine on other graphs, to tell graph differences from engine ones")
    p.add_argument("--tcd-ort-plain-attention", action="store_true",
                   help="also run tcd-ort on an export with --attention plain (tcd-ort-plain/, "
                        "built if missing): the fused attention's share, in the same run")
    p.add_argument("--tcd-ort-low-memory", action="store_true",
                   help="also run tcd-ort with --low-memory")
    p.add_argument("--tcd-ort-fp16", action="store_true",
                   help="also export with --dtype fp16 (float16 text encoder and UNet weights, "
                        "float32 VAE) and run tcd-ort on it")
    p.add_argument("--tcd-ort-keep-loaded", action="store_true",
                   help="also run tcd-ort with --keep-loaded (every component loaded to the "
                        "end, the CPU arena off: what an engine serving many requests holds)")
    p.add_argument("--tiny-vae", action="store_true",
                   help="also run tcd-ort `run --tiny-vae` and diffusers with pipe.vae = "
                        "AutoencoderTiny, on a random full-size TAESD (taesd-diffusers/ and its "
                        "export taesd/, built if missing)")
    p.add_argument("--skip-diffusers", action="store_true",
                   help="skip diffusers with the model's VAE (with --tiny-vae, diffusers still "
                        "runs with the tiny one)")
    p.add_argument("--second-start", action="store_true",
                   help="time tcd-ort's second start: it runs with --session-cache, filled by "
                        "one untimed run first, so the timed runs load the optimised graphs")
    p.add_argument("--tcd-ort", help="tcd-ort binary (default: cargo build --release)")
    p.add_argument("--threads", type=int,
                   help="intra-op threads for every engine (default: each engine's own)")
    p.add_argument("--gemm-n", type=int, default=2048)
    p.add_argument("--json", type=pathlib.Path, help="also write every run and the summary here")
    # worker mode (internal)
    p.add_argument("--worker", choices=["diffusers", "optimum", "gemm", "flops", "taesd"],
                   help=argparse.SUPPRESS)
    p.add_argument("--tiny-vae-dir", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--out-json", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker in ("diffusers", "optimum"):
        worker_pipeline(args.worker, args.family, args.model, args.output, args.out_json,
                        args.tiny_vae_dir)
        return 0
    if args.worker == "taesd":
        worker_taesd(args.model, SEED)
        return 0
    if args.worker == "gemm":
        worker_gemm(args.gemm_n, 10, args.threads, args.out_json)
        return 0
    if args.worker == "flops":
        worker_flops(args.family, args.model, args.out_json, args.tiny_vae_dir)
        return 0

    if not shutil.which("/usr/bin/time"):
        sys.exit("/usr/bin/time is needed for peak RSS (Debian: apt-get install time)")
    if not args.skip_optimum and not OPTIMUM_PY.exists():
        sys.exit(f"{OPTIMUM_PY} is missing: `make venv-optimum`, or pass --skip-optimum")
    base = args.workdir.resolve() / args.family
    base.mkdir(parents=True, exist_ok=True)
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), **cpu_info(),
            "family": args.family, "size": SIZES[args.family], "steps": STEPS, "eta": ETA,
            "seed": SEED, "guidance": 0.0, "repeats": args.repeats, "threads": args.threads,
            "second_start": args.second_start}
    log(json.dumps(info))
    created = []
    try:
        binary = ensure_binary(args)
        created = ensure_models(args, base)
        if args.build_only:
            created = []
            log(f"models ready under {base}")
            return 0
        # tcd-ort variants: the model directory each runs and its extra flags.
        variants = {"tcd-ort": ("tcd-ort", ())}
        if args.tiny_vae:
            variants["tcd-ort --tiny-vae"] = ("tcd-ort", ("--tiny-vae", str(base / "taesd")))
        if args.tcd_ort_low_memory:
            variants["tcd-ort --low-memory"] = ("tcd-ort", ("--low-memory",))
        if args.tcd_ort_fp16:
            variants["tcd-ort, fp16 export"] = ("tcd-ort-fp16", ())
        if args.tcd_ort_keep_loaded:
            variants["tcd-ort --keep-loaded"] = ("tcd-ort", ("--keep-loaded",))
        if args.tcd_ort_plain_attention:
            variants["tcd-ort, plain attention"] = ("tcd-ort-plain", ())
        if args.tcd_ort_optimum_graphs and not args.skip_optimum:
            variants["tcd-ort on optimum's graphs"] = ("optimum", ())
        engines = list(variants) + [e for e, skip in (
            ("diffusers", args.skip_diffusers), ("diffusers --tiny-vae", not args.tiny_vae),
            ("optimum", args.skip_optimum)) if not skip]
        with tempfile.TemporaryDirectory(prefix="e2e-cpu-") as tmp:
            scratch = pathlib.Path(tmp)
            flops = run_worker("flops", ["--family", args.family, "--model",
                                         base / "diffusers"] + (
                ["--tiny-vae-dir", base / "taesd-diffusers"] if args.tiny_vae else []), scratch)
            gemm_args = ["--gemm-n", str(args.gemm_n)] + (
                ["--threads", str(args.threads)] if args.threads else [])
            gemm = [run_worker("gemm", gemm_args, scratch)]
            log(f"GEMM {args.gemm_n}^3: {gemm[0]['best_gflops']:.0f} GFLOP/s; UNet step "
                f"{flops['unet_step_flops'] / 1e9:.0f} GFLOP, VAE decode "
                f"{flops['vae_decode_flops'] / 1e9:.0f} GFLOP")
            rows: dict[str, list[dict]] = {e: [] for e in engines}
            if args.second_start:
                for engine, (model_dir, flags) in variants.items():
                    log(f"{engine}: filling the session cache (untimed)")
                    r = run_tcd_ort(args, binary, base / model_dir, scratch, "store", flags)
                    if "error" in r:
                        log(f"{engine} failed:\n{r['error']}")
                        return 1
            for i in range(args.repeats):
                for engine in engines:
                    log(f"{engine} run {i + 1}/{args.repeats} (load average {load_average()})")
                    if engine in variants:
                        model_dir, flags = variants[engine]
                        r = run_tcd_ort(args, binary, base / model_dir, scratch, i, flags)
                    else:
                        r = run_python(args, engine, base, scratch, i)
                    rows[engine].append(r)
                    if "error" in r:
                        log(f"{engine} failed:\n{r['error']}")
                    else:
                        log(f"{engine}: wall {r['wall_s']:.1f} s, load {r['load_s']:.1f} s, "
                            f"generate {r['generate_s']:.1f} s, peak {r['peak_rss_gib']:.2f} GiB")
            gemm.append(run_worker("gemm", gemm_args, scratch))
    finally:
        if not args.keep:
            for d in created:
                log(f"removing {d}")
                shutil.rmtree(d, ignore_errors=True)

    peak = max(g["best_gflops"] for g in gemm)
    summary = {e: summarise(rs) for e, rs in rows.items()}
    summary = {e: s for e, s in summary.items() if s is not None}
    size = SIZES[args.family]
    print(f"\n{args.family} {size}x{size}, {STEPS} TCD steps, guidance 0, eta {ETA}, seed {SEED}, "
          f"fp32, CPU; {info['cpu']}, {info['cpus']} CPUs, {info['mem_gib']} GiB; {info['date']}")
    print(f"medians of {args.repeats} fresh process(es) per engine; fp32 GEMM peak "
          f"{peak:.0f} GFLOP/s ({args.gemm_n}^3 MatMul, onnxruntime {gemm[0]['onnxruntime']}, "
          f"best of before {gemm[0]['best_gflops']:.0f} / after {gemm[1]['best_gflops']:.0f}); "
          f"UNet step {flops['unet_step_flops'] / 1e9:.0f} GFLOP, VAE decode "
          f"{flops['vae_decode_flops'] / 1e9:.0f} GFLOP"
          + (f", tiny VAE decode {flops['vae_tiny_decode_flops'] / 1e9:.0f} GFLOP"
             if flops.get("vae_tiny_decode_flops") else ""))
    if args.second_start:
        print("tcd-ort: second start (--session-cache, filled by an untimed first run)")
    print("tcd-ort / engine (tcd-ort on the same VAE) below 1: tcd-ort is faster\n")
    print(table(summary, flops, peak))
    print()
    for engine, s in summary.items():
        print(f"load average during {engine}: {'; '.join(s['loads'])}")
    for engine, rs in rows.items():
        for r in rs:
            if "calls" in r:
                parts = ", ".join(f"{k} {v['calls']}x {v['seconds']:.2f} s"
                                  for k, v in r["calls"].items())
                extra = (f"; imports {r['import_s']:.2f} s, PNG {r['save_s']:.2f} s"
                         if "import_s" in r else "")
                print(f"{engine}: {parts}{extra}")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "gemm": gemm, "flops": flops,
                                         "summary": summary, "runs": rows}, indent=1) + "\n")
    return 0 if all(not any("error" in r for r in rs) for rs in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
