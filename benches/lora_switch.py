"""Benchmark: switching LoRAs per request in `tcd-ort serve` beside reloading the model.

For each family (default SD1.5) this builds, under --workdir (outside the repository):

* `<family>/diffusers/`: a full-size random-weight pipeline (`python -m export full`), or a
  hard-linked copy of `--source` when one is given (an earlier `export full` of the same family);
* `<family>/slots<RANK>/`: `python -m export convert ... --lora-slots RANK` (default rank 64), whose
  manifest must say `lora_slots.unet.overridable: true` (the slots are ONNX overridable
  initializers the engine feeds to the loaded UNet session);
* `<family>/loras/tcd.safetensors`: a TCD-shaped LoRA, rank 64, UNet only, diffusers/peft keys
  (`unet.<module>.lora_A.weight`, fp16, no alpha), on the modules of `h1t/TCD-SD15-LoRA`
  (`lora_apply.py`'s writer, the slots' own target modules);
* `<family>/loras/style.safetensors`: a kohya-format style LoRA, rank 4, on the UNet's attention,
  feed-forward, proj and resnet layers and on the text encoder(s) (`tests/golden/make_lora.py`'s
  writer). Beside the TCD LoRA it overflows the rank-64 slots on the modules both touch, so those
  are fused and the UNet is rebuilt; alone it fits the slots, and only the text encoder is rebuilt.

Then it starts `tcd-ort serve --lora-dir <family>/loras` once and sends A1111 txt2img requests
(`--size`, default the family's native size, `--steps` 1, cfg_scale 0, seed 0) whose prompts
name the LoRAs with `<lora:NAME:WEIGHT>` tags, cycling `--repeats` times through

    none -> tcd -> tcd+style -> tcd@0.5 -> style -> none

(plus one repeat of the same set, which must report `unchanged`). Each request records the
answer's `info.lora_switch` (seconds, unchanged, slot_tensors, rebuilt) and its wall time.
Interleaved with the switches (A B A B), the alternative is timed for the set just switched to:
a reload, i.e. a second `tcd-ort serve --lora FILE:W ...` started with that set, up to its
`loaded ... in Xs` line (the engine load, 0.1 s resolution) and its `listening on` line (process
wall from spawn), then stopped with SIGTERM. With `--run-reload` each set is also run once as
`tcd-ort run --lora FILE:W ... --timings t.json` (its `load_s`) after the switches, and with
`--cache-check` each set is reloaded twice more with `--session-cache` (a fresh directory:
first start, then second start).

Prints per switch kind the medians over the repeats: switch seconds, what was rebuilt, slot
tensors fed, request wall, and the reload's seconds with the ratio reload / switch.

    .venv/bin/python benches/lora_switch.py --source /work/anim-bench/diffusers
    .venv/bin/python benches/lora_switch.py --families sd15 --repeats 3 --json switch.json
    .venv/bin/python benches/lora_switch.py --rank 128 --repeats 1 --cache-check

Needs the release binary (`cargo build --release --bin tcd-ort`), about 8 GB of disk per SD1.5
(diffusers + ONNX), and memory for two engines at once during the reloads (SD1.5 fp32: ~10 GB).
`--lora-slots` exports float32 only (`convert` refuses `--dtype fp16` with it), so SDXL needs the
fp32 pipeline in memory to export (~14 GB plus the exporter's) and, for a switch past the slot
rank, the old and the rebuilt UNet session at once (2 x ~11 GB): the script refuses SDXL below
40 GiB of available memory unless `--force`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from benchlib import PROMPT, SIZES, cpu_info, load_average  # noqa: E402

VENV_PY = str(ROOT / ".venv" / "bin" / "python")
RANK = 64
STYLE_WEIGHT = 0.8
# (label, [(lora name, weight), ...]); the request sequence of one cycle.
SETS = {
    "none": [],
    "tcd": [("tcd", 1.0)],
    "tcd+style": [("tcd", 1.0), ("style", STYLE_WEIGHT)],
    "tcd@0.5": [("tcd", 0.5)],
    "style": [("style", STYLE_WEIGHT)],
}
CYCLE = ("none", "tcd", "tcd+style", "tcd@0.5", "style")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


# ------------------------------------------------------------------------------------------------
# preparation
# ------------------------------------------------------------------------------------------------


def worker_loras(family: str, diffusers_dir: str, out_dir: str) -> None:
    """Writes tcd.safetensors and style.safetensors; the models are built on the meta device."""
    import types

    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests" / "golden"))
    sys.path.insert(0, str(ROOT / "benches"))
    import lora_apply  # noqa: I001 (two script directories)
    import make_lora

    src = pathlib.Path(diffusers_dir)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            json.loads((src / "unet" / "config.json").read_text())
        ).eval()
        pipe = types.SimpleNamespace(unet=unet)
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        pipe.text_encoder = CLIPTextModel(
            CLIPTextConfig.from_pretrained(src / "text_encoder")
        ).eval()
        if (src / "text_encoder_2").is_dir():
            pipe.text_encoder_2 = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(src / "text_encoder_2")
            ).eval()
    # TCD: rank 64 on every slotted module, fp16, diffusers keys, no alpha (scale 1).
    state, modules = lora_apply._lora_state_dict(unet, RANK, seed=1)
    StableDiffusionPipeline.save_lora_weights(
        str(out), unet_lora_layers=state, weight_name="tcd.safetensors"
    )
    tcd_params = sum(t.numel() for t in state.values())
    del state
    # Style: rank 4 on UNet + text encoder(s), kohya keys with per-component alphas.
    targets = make_lora.target_modules(pipe)
    style = make_lora.random_lora(pipe, targets, 7, make_lora.ALPHAS)
    if family == "sdxl":
        names = make_lora.sgm_name(dict(unet.config))
        make_lora.write_kohya(style, out / "style.safetensors", family, names)
    else:
        make_lora.write_kohya(style, out / "style.safetensors", family)
    # fp16 on disk like released style LoRAs (alphas stay f32 scalars).
    from safetensors.torch import load_file

    sd = load_file(str(out / "style.safetensors"))
    sd = {k: (v if k.endswith(".alpha") else v.half()) for k, v in sd.items()}
    save_file(sd, str(out / "style.safetensors"))
    index = {
        "tcd": {"rank": RANK, "modules": len(modules), "params": tcd_params},
        "style": {
            "rank": make_lora.RANK,
            "modules": {c: len(m) for c, m in targets.items()},
            "unet_modules_also_in_tcd": len(set(targets["unet"]) & set(modules)),
        },
    }
    (out / "index.json").write_text(json.dumps(index, indent=1))


def run_logged(cmd: list[str]) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)


def prepare(args, family: str) -> dict[str, Any]:
    if family == "sdxl" and not args.force and mem_available_gib() < 40:
        sys.exit(f"sdxl: {mem_available_gib():.1f} GiB available, ~40 needed (see the docstring);"
                 " --force to try anyway")
    base = args.workdir / family
    base.mkdir(parents=True, exist_ok=True)
    diffusers_dir = base / "diffusers"
    if not (diffusers_dir / "model_index.json").is_file():
        if args.source:
            run_logged(["cp", "-al", str(args.source), str(diffusers_dir)])
        else:
            run_logged([VENV_PY, "-m", "export", "full", "--family", family, str(diffusers_dir)])
    model = base / f"slots{args.rank}"
    if not (model / "tcd_ort.json").is_file():
        t = time.perf_counter()
        run_logged([VENV_PY, "-m", "export", "convert", str(diffusers_dir), str(model),
                    "--lora-slots", str(args.rank), "--overwrite"])
        log(f"{family}: converted in {time.perf_counter() - t:.0f} s")
    manifest = json.loads((model / "tcd_ort.json").read_text())
    slots = manifest.get("lora_slots", {}).get("unet", {})
    if not slots.get("overridable"):
        sys.exit(f"{model}: lora_slots.unet.overridable is not true; re-export with this exporter")
    loras = base / "loras"
    if not (loras / "index.json").is_file():
        run_logged([VENV_PY, __file__, "--worker-loras", family, str(diffusers_dir), str(loras)])
    return {
        "model": model,
        "loras": loras,
        "slots": {k: v for k, v in slots.items() if k != "modules"},
        "slot_modules": len(slots.get("modules", [])),
        "lora_index": json.loads((loras / "index.json").read_text()),
        "model_gb": sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) / 1e9,
    }


# ------------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------------


class Server:
    """`tcd-ort serve` in the background; `start()` returns once it prints `listening on`."""

    LOADED = re.compile(r"^loaded .* in ([0-9.]+)s")

    def __init__(self, cmd: list[str]):
        self.cmd = cmd
        self.lines: list[str] = []
        self.url: str | None = None
        self.loaded_s: float | None = None
        self.listening_s: float | None = None

    def start(self, timeout: float = 900) -> Server:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, cwd=ROOT)
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                line = line.rstrip("\n")
                self.lines.append(line)
                m = self.LOADED.match(line)
                if m:
                    self.loaded_s = float(m.group(1))
                if line.startswith("listening on "):
                    self.url = line.split("listening on ", 1)[1].strip()
                    self.listening_s = time.perf_counter() - t0
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or self.url is None:
            self.stop()
            sys.exit("server did not start:\n" + "\n".join(self.lines[-30:]))
        return self

    def rss_gib(self) -> float | None:
        try:
            for line in open(f"/proc/{self.proc.pid}/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
        except OSError:
            return None
        return None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def lora_args(loras: pathlib.Path, entries: list[tuple[str, float]]) -> list[str]:
    out = []
    for name, weight in entries:
        out += ["--lora", f"{loras / (name + '.safetensors')}:{weight:g}"]
    return out


def txt2img(url: str, label: str, size: int, steps: int) -> dict[str, Any]:
    tags = "".join(f"<lora:{n}:{w:g}>" for n, w in SETS[label])
    payload = {"prompt": PROMPT + tags, "steps": steps, "width": size, "height": size,
               "cfg_scale": 0, "seed": 0}
    req = urllib.request.Request(url + "/sdapi/v1/txt2img", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=1800) as r:
        body = json.loads(r.read())
    wall = time.perf_counter() - t
    info = json.loads(body["info"])
    sw = info["lora_switch"]
    return {"set": label, "wall_s": wall, "switch_s": sw["seconds"],
            "unchanged": sw["unchanged"], "slot_tensors": sw["slot_tensors"],
            "rebuilt": sw["rebuilt"], "images": len(body["images"])}


def reload(args, prep, label: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    cmd = [str(args.bin), "serve", "--model", str(prep["model"]), "--listen", "127.0.0.1:0",
           "-q", *extra] + lora_args(prep["loras"], SETS[label])
    s = Server(cmd).start()
    rss = s.rss_gib()
    # The server prints `listening on` before its SIGTERM handler is in place (the handler is
    # set up when axum starts serving); one answered request makes sure it is.
    urllib.request.urlopen(s.url + "/healthz", timeout=60).read()
    rc = s.stop()
    if rc != 0:
        log(f"reload {label}: server exited {rc}")
    return {"set": label, "loaded_s": s.loaded_s, "listening_s": s.listening_s, "rss_gib": rss}


def run_reload(args, prep, label: str, scratch: pathlib.Path) -> dict[str, Any]:
    timings = scratch / f"run-{label}.json"
    cmd = [str(args.bin), "run", "--model", str(prep["model"]), "--prompt", PROMPT,
           "--steps", str(args.steps), "--guidance", "0", "--seed", "0",
           "--width", str(args.size_for), "--height", str(args.size_for),
           "--output", str(scratch / "run.png"), "--timings", str(timings), "--overwrite", "-q",
           ] + lora_args(prep["loras"], SETS[label])
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    j = json.loads(timings.read_text())
    return {"set": label, "load_s": j.get("load_s"), "wall_s": wall,
            "steps_s": j.get("steps_s"), "decode_s": j.get("decode_s")}


def bench_family(args, family: str) -> dict[str, Any]:
    prep = prepare(args, family)
    args.size_for = args.size or SIZES[family]
    log(f"{family}: model {prep['model']} ({prep['model_gb']:.1f} GB), slots {prep['slots']}, "
        f"{prep['slot_modules']} modules; loras {prep['lora_index']}")
    server = Server([str(args.bin), "serve", "--model", str(prep["model"]), "--listen",
                     "127.0.0.1:0", "--lora-dir", str(prep["loras"]), "-q"]).start()
    log(f"{family}: server at {server.url}, loaded in {server.loaded_s}s, "
        f"listening after {server.listening_s:.1f}s, RSS {server.rss_gib():.2f} GiB")
    switches: list[dict[str, Any]] = []
    reloads: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="lora-switch-"))
    try:
        warm = txt2img(server.url, "none", args.size_for, args.steps)
        log(f"warm-up request: {warm['wall_s']:.1f} s")
        prev = "none"
        sequence = [label for _ in range(args.repeats) for label in CYCLE[1:] + ("none",)]
        sequence.insert(1, "tcd")  # the same set twice: `unchanged`
        for i, label in enumerate(sequence):
            r = txt2img(server.url, label, args.size_for, args.steps)
            r["from"], r["kind"] = prev, f"{prev} -> {label}"
            r["rss_gib"] = server.rss_gib()
            r["load_average"] = load_average()
            switches.append(r)
            log(f"[{i + 1}/{len(sequence)}] {r['kind']}: switch {r['switch_s']:.3f} s "
                f"(unchanged {r['unchanged']}, slots {r['slot_tensors']}, rebuilt {r['rebuilt']}),"
                f" request {r['wall_s']:.1f} s, server RSS {r['rss_gib']:.2f} GiB")
            if not r["unchanged"] and args.reloads:
                rl = reload(args, prep, label)
                reloads.append(rl)
                log(f"    reload {label}: loaded in {rl['loaded_s']} s, listening after "
                    f"{rl['listening_s']:.1f} s, RSS {rl['rss_gib']:.2f} GiB")
            prev = label
        server_rss = server.rss_gib()
    finally:
        rc = server.stop()
    log(f"server exited {rc}")
    cached: list[dict[str, Any]] = []
    if args.cache_check:
        cache = scratch / "session-cache"
        for label in CYCLE:
            for k in range(2):
                r = reload(args, prep, label, ("--session-cache", str(cache)))
                r["start"] = "first" if k == 0 else "second"
                cached.append(r)
                log(f"reload {label} with --session-cache ({r['start']} start): "
                    f"loaded in {r['loaded_s']} s")
    if args.run_reload:
        for label in CYCLE:
            r = run_reload(args, prep, label, scratch)
            runs.append(r)
            log(f"tcd-ort run {label}: load_s {r['load_s']:.2f}, wall {r['wall_s']:.1f} s")
    shutil.rmtree(scratch, ignore_errors=True)
    return {"family": family, "model": str(prep["model"]), "model_gb": prep["model_gb"],
            "slots": prep["slots"], "slot_modules": prep["slot_modules"],
            "loras": prep["lora_index"], "size": args.size_for, "steps": args.steps,
            "server_loaded_s": server.loaded_s, "server_listening_s": server.listening_s,
            "server_rss_end_gib": server_rss, "warmup": warm,
            "switches": switches, "reloads": reloads, "runs": runs, "cached_reloads": cached}


def med(vals: list) -> float | None:
    vals = [v for v in vals if isinstance(v, (int, float))]
    return statistics.median(vals) if vals else None


def table(res: dict[str, Any]) -> str:
    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    rows = ["| switch | n | switch s | rebuilt | slot tensors | request wall s | "
            "request - switch s | reload: engine load s | reload: spawn to listening s | "
            "reload / switch | `tcd-ort run` load_s |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    kinds: dict[str, list[dict]] = {}
    for s in res["switches"]:
        kinds.setdefault(s["kind"], []).append(s)
    for kind, ss in kinds.items():
        target = ss[0]["set"]
        rl = [r for r in res["reloads"] if r["set"] == target]
        run = [r for r in res["runs"] if r["set"] == target]
        sw = med([s["switch_s"] for s in ss])
        load = med([r["loaded_s"] for r in rl])
        rebuilt = sorted({",".join(s["rebuilt"]) or "none" for s in ss})
        unchanged = all(s["unchanged"] for s in ss)
        ratio = None if unchanged or not sw or load is None else load / sw
        rows.append(
            f"| {kind}{' (unchanged)' if unchanged else ''} | {len(ss)} | {f(sw, '{:.3f}')} | "
            f"{' / '.join(rebuilt)} | {f(med([s['slot_tensors'] for s in ss]), '{:.0f}')} | "
            f"{f(med([s['wall_s'] for s in ss]), '{:.1f}')} | "
            f"{f(med([s['wall_s'] - s['switch_s'] for s in ss]), '{:.1f}')} | "
            f"{'-' if unchanged else f(load, '{:.1f}')} | "
            f"{'-' if unchanged else f(med([r['listening_s'] for r in rl]), '{:.1f}')} | "
            f"{f(ratio, '{:.1f}x')} | {f(med([r['load_s'] for r in run]))} |"
        )
    if res.get("cached_reloads"):
        rows += ["", "| set | reload s | with --session-cache, first start s | second start s |",
                 "|---|---:|---:|---:|"]
        for label in CYCLE:
            c = [r for r in res["cached_reloads"] if r["set"] == label]
            plain = med([r["loaded_s"] for r in res["reloads"] if r["set"] == label])
            first = med([r["loaded_s"] for r in c if r["start"] == "first"])
            second = med([r["loaded_s"] for r in c if r["start"] == "second"])
            rows.append(f"| {label} | {f(plain, '{:.1f}')} | {f(first, '{:.1f}')} | "
                        f"{f(second, '{:.1f}')} |")
    return "\n".join(rows)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker-loras":
        worker_loras(*sys.argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="sd15", help="comma-separated: sd15, sdxl")
    p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/work/bench-models"))
    p.add_argument("--source", type=pathlib.Path,
                   help="an existing `export full` pipeline of the (single) family to hard-link")
    p.add_argument("--rank", type=int, default=RANK, help="--lora-slots rank (default 64)")
    p.add_argument("--force", action="store_true", help="try SDXL whatever the free memory")
    p.add_argument("--bin", type=pathlib.Path, default=ROOT / "target" / "release" / "tcd-ort")
    p.add_argument("--repeats", type=int, default=2, help="cycles through the LoRA sets")
    p.add_argument("--size", type=int, help="image edge (default: the family's native size)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--no-reloads", dest="reloads", action="store_false",
                   help="skip the interleaved server reloads")
    p.add_argument("--run-reload", action="store_true",
                   help="also time `tcd-ort run --lora ...` once per set (its load_s)")
    p.add_argument("--cache-check", action="store_true",
                   help="also reload each set twice with --session-cache (a fresh directory)")
    p.add_argument("--prepare-only", action="store_true",
                   help="build the models and LoRAs, then stop")
    p.add_argument("--json", type=pathlib.Path)
    args = p.parse_args()
    if args.prepare_only:
        for family in args.families.split(","):
            log(f"{family}: {prepare(args, family)}")
        return 0
    if not args.bin.is_file():
        sys.exit(f"{args.bin}: build it with cargo build --release --bin tcd-ort")
    started = datetime.datetime.now(datetime.timezone.utc)
    out: dict[str, Any] = {"date": started.isoformat(timespec="seconds"), "machine": cpu_info(),
                           "load_average_start": load_average(), "results": []}
    for family in args.families.split(","):
        log(f"{family}: {mem_available_gib():.1f} GiB available")
        res = bench_family(args, family)
        out["results"].append(res)
        print(f"\n{family}, {res['size']}x{res['size']}, {res['steps']} step(s), "
              f"--lora-slots {args.rank} (fp32); medians over repeats\n")
        print(table(res), flush=True)
    out["load_average_end"] = load_average()
    print(f"\nload average {out['load_average_start']} -> {out['load_average_end']}; "
          f"{out['machine']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
