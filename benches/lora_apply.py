"""Benchmark: applying a TCD-shaped LoRA to a full-size UNet, tcd-ort beside diffusers.

For each family (SD1.5, SDXL) this builds a full-size random-weight UNet from
`export/configs/<family>/unet.json` and a random rank-64 LoRA with the module set of
`h1t/TCD-SD15-LoRA` / `h1t/TCD-SDXL-LoRA`, then measures in fresh processes:

* tcd-ort: `benches/lora_apply.rs` (`tcd_ort::pipeline::apply_loras`, the engine's load-time
  LoRA step: parse, check names and shapes, read every base weight from the ONNX external data,
  add the summed delta);
* diffusers: `unet.load_lora_adapter(state_dict, prefix="unet")` + `unet.fuse_lora()` on a UNet
  already loaded, which is what `pipe.load_lora_weights(...)` + `pipe.fuse_lora()` do for the UNet.

Wall time is the step alone; peak RSS is the whole process's (`/usr/bin/time -v`), so the
diffusers column includes the loaded UNet, and the tcd-ort column includes the patched weights it
hands to ONNX Runtime.

The model directory does not hold a real UNet graph: `unet/model.onnx` is a trivial graph whose
initializers are every UNet parameter under its PyTorch name, stored as external data. The
external data file is the UNet's `diffusion_pytorch_model.safetensors` (ONNX
external data is an offset and a length in any file, and safetensors stores each tensor as
contiguous little-endian bytes) and diffusers reads it through a symlink, so both sides read the
same bytes and SDXL costs 10 GB of disk once, not twice.

Slot mode (`--mode slots`) times the same LoRA applied to a model exported with LoRA slots
(`python -m export convert --lora-slots 64`, see export/lora_slots.py): the engine copies the
LoRA's A and B into the slot initializers (scaled, zero-padded) instead of fusing, so no base
weight is read. Its model directory is again an initializer-only graph, now with every UNet
parameter and the slot initializers `<module>.lora_A.weight` / `.lora_B.weight` under their
exported names and shapes, and the manifest's `lora_slots` entry. Its external data is a sparse
file of zeros (the slot path reads none of it), so the UNet is only built on the meta device
(names and shapes) and SDXL needs no memory or disk beyond the LoRA. The timed phase is the
fused mode's: from the LoRA file's path to the replacements ready for ONNX Runtime.

Run with the project's venv from the repository root:

    .venv/bin/python benches/lora_apply.py                  # sd15 then sdxl
    .venv/bin/python benches/lora_apply.py --families sd15 --repeats 3
    .venv/bin/python benches/lora_apply.py --mode slots --repeats 3

The fused mode needs about 2.2x the UNet's fp32 size in free memory (SD1.5: ~8 GB, SDXL: ~23 GB)
and the same on disk under --workdir (default: a temporary directory under /tmp, removed at the
end); the slot mode about 2 GB of memory and the LoRA file on disk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "export" / "configs"
RANK = 64

# `lora_target_modules` default of diffusers' examples/consistency_distillation/
# train_lcm_distill_lora_sd_wds.py and train_lcm_distill_lora_sdxl(_wds).py, which TCD's training
# code inherits: LCM-LoRA and TCD-LoRA patch only the UNet, with these peft target names
# (matched as `name == t or name.endswith("." + t)`).
TARGET_MODULES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)

PIPELINE_CLASS = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}

# A graph ONNX accepts: one Identity node; the weights ride along as initializers.
TRIVIAL_NODE = ("x", "y")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


# ------------------------------------------------------------------------------------------------
# preparation (runs in its own process so the driver stays small)
# ------------------------------------------------------------------------------------------------


def _lora_state_dict(unet: Any, rank: int, seed: int) -> tuple[dict[str, Any], list[str]]:
    """peft-named LoRA tensors (`<module>.lora_A.weight`, `.lora_B.weight`) for every target."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}
    modules = []
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in TARGET_MODULES):
            continue
        if isinstance(module, torch.nn.Linear):
            a_shape = (rank, module.in_features)
            b_shape = (module.out_features, rank)
        elif isinstance(module, torch.nn.Conv2d):
            a_shape = (rank, module.in_channels, *module.kernel_size)
            b_shape = (module.out_channels, rank, 1, 1)
        else:
            continue
        fan_in = a_shape[1] * (a_shape[2] * a_shape[3] if len(a_shape) == 4 else 1)
        a = torch.randn(a_shape, generator=gen) / fan_in**0.5
        b = torch.randn(b_shape, generator=gen) * (0.01 / rank**0.5)
        # fp16 on disk, like the released TCD / LCM LoRA files.
        state[f"{name}.lora_A.weight"] = a.half()
        state[f"{name}.lora_B.weight"] = b.half()
        modules.append(name)
    return state, modules


def _trivial_graph(initializers: list[Any]) -> Any:
    from onnx import TensorProto, helper

    x, y = TRIVIAL_NODE
    graph = helper.make_graph(
        [helper.make_node("Identity", [x], [y])],
        "weights",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1])],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _external_initializers(safetensors_file: pathlib.Path, location: str) -> list[Any]:
    """One external-data initializer per tensor of a safetensors file, pointing into it."""
    from onnx import TensorProto

    with open(safetensors_file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    base = 8 + header_len
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise SystemExit(f"{name}: expected F32, got {info['dtype']}")
        begin, end = info["data_offsets"]
        t = TensorProto()
        t.name = name
        t.data_type = TensorProto.FLOAT
        t.dims.extend(info["shape"])
        t.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", location),
            ("offset", base + begin),
            ("length", end - begin),
        ):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        out.append(t)
    return out


def prepare(family: str, work: pathlib.Path, rank: int) -> dict[str, Any]:
    import onnx
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    config = json.loads((CONFIG_DIR / family / "unet.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_source")}
    log(f"{family}: building the UNet")
    unet = UNet2DConditionModel.from_config(config).eval()
    unet_params = sum(p.numel() for p in unet.parameters())
    state, modules = _lora_state_dict(unet, rank, seed=1)
    patched = sum(unet.get_submodule(m).weight.numel() for m in modules)
    log(f"{family}: saving {unet_params / 1e9:.2f}B parameters")
    unet_dir = work / "diffusers_unet"
    unet.save_pretrained(unet_dir, safe_serialization=True, max_shard_size="1000GB")
    del unet
    lora_dir = work / "lora"
    StableDiffusionPipeline.save_lora_weights(lora_dir, unet_lora_layers=state)
    lora_file = lora_dir / "pytorch_lora_weights.safetensors"
    lora_params = sum(t.numel() for t in state.values())
    del state

    model = work / "model"
    for sub in ("unet", "text_encoder", "vae_decoder", "scheduler") + (
        ("text_encoder_2",) if family == "sdxl" else ()
    ):
        (model / sub).mkdir(parents=True, exist_ok=True)
    # The weights move to the ONNX side (the checker refuses hard-linked external data) and
    # diffusers reads them through a symlink.
    weights = model / "unet" / "model.onnx_data"
    os.replace(unet_dir / "diffusion_pytorch_model.safetensors", weights)
    os.symlink(weights, unet_dir / "diffusion_pytorch_model.safetensors")
    onnx.save(
        _trivial_graph(_external_initializers(weights, "model.onnx_data")),
        str(model / "unet" / "model.onnx"),
    )
    # By path, so the checker resolves the external data beside the graph.
    onnx.checker.check_model(str(model / "unet" / "model.onnx"))
    shutil.copy(unet_dir / "config.json", model / "unet" / "config.json")
    # Text encoders and VAE: only what `ModelDir::open` checks for (their files exist).
    for sub in ("text_encoder", "vae_decoder") + (("text_encoder_2",) if family == "sdxl" else ()):
        onnx.save(_trivial_graph([]), str(model / sub / "model.onnx"))
    shutil.copy(CONFIG_DIR / family / "vae.json", model / "vae_decoder" / "config.json")
    shutil.copy(
        CONFIG_DIR / family / "scheduler.json", model / "scheduler" / "scheduler_config.json"
    )
    (model / "model_index.json").write_text(json.dumps({"_class_name": PIPELINE_CLASS[family]}))
    (model / "tcd_ort.json").write_text(
        json.dumps(
            {"format_version": 1, "family": family, "dtype": "float32", "weights_keep_names": True}
        )
    )
    return {
        "unet_params": unet_params,
        "modules": len(modules),
        "lora_params": lora_params,
        "lora_mb": lora_file.stat().st_size / 1e6,
        "patched_params": patched,
        "model_dir": str(model),
        "unet_dir": str(unet_dir),
        "lora_file": str(lora_file),
    }


def _sparse_initializers(
    shapes: list[tuple[str, tuple[int, ...]]], location: str, start: int
) -> tuple[list[Any], int]:
    """float32 external-data initializers laid out one after another from `start`; returns them
    and the end offset."""
    from onnx import TensorProto

    out, offset = [], start
    for name, shape in shapes:
        length = 4
        for d in shape:
            length *= d
        t = TensorProto()
        t.name = name
        t.data_type = TensorProto.FLOAT
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", length)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        out.append(t)
        offset += length
    return out, offset


def prepare_slots(family: str, work: pathlib.Path, rank: int) -> dict[str, Any]:
    """A slot-exported model directory (initializer-only graph over a sparse zero file) and the
    TCD-shaped LoRA; the UNet is built on the meta device, so no weights are materialised."""
    import onnx
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    sys.path.insert(0, str(ROOT))
    from export.lora_slots import manifest_entry

    torch.manual_seed(0)
    config = json.loads((CONFIG_DIR / family / "unet.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_source")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).eval()
    params = [(n, tuple(p.shape)) for n, p in unet.named_parameters()]
    unet_params = sum(p.numel() for p in unet.parameters())
    state, modules = _lora_state_dict(unet, rank, seed=1)
    slots = []
    for m in modules:
        w = unet.get_submodule(m).weight
        if w.ndim == 4:
            slots.append((f"{m}.lora_A.weight", (rank, w.shape[1], *w.shape[2:])))
            slots.append((f"{m}.lora_B.weight", (w.shape[0], rank, 1, 1)))
        else:
            slots.append((f"{m}.lora_A.weight", (rank, w.shape[1])))
            slots.append((f"{m}.lora_B.weight", (w.shape[0], rank)))
    lora_dir = work / "lora"
    StableDiffusionPipeline.save_lora_weights(lora_dir, unet_lora_layers=state)
    lora_file = lora_dir / "pytorch_lora_weights.safetensors"
    lora_params = sum(t.numel() for t in state.values())
    del state

    model = work / "model"
    for sub in ("unet", "text_encoder", "vae_decoder", "scheduler") + (
        ("text_encoder_2",) if family == "sdxl" else ()
    ):
        (model / sub).mkdir(parents=True, exist_ok=True)
    inits, end = _sparse_initializers(params, "model.onnx_data", 0)
    slot_inits, end = _sparse_initializers(slots, "model.onnx_data", end)
    with open(model / "unet" / "model.onnx_data", "wb") as f:
        f.truncate(end)  # sparse: reads as zeros, takes no disk
    onnx.save(_trivial_graph(inits + slot_inits), str(model / "unet" / "model.onnx"))
    onnx.checker.check_model(str(model / "unet" / "model.onnx"))
    (model / "unet" / "config.json").write_text(json.dumps(config))
    for sub in ("text_encoder", "vae_decoder") + (("text_encoder_2",) if family == "sdxl" else ()):
        onnx.save(_trivial_graph([]), str(model / sub / "model.onnx"))
    shutil.copy(CONFIG_DIR / family / "vae.json", model / "vae_decoder" / "config.json")
    shutil.copy(
        CONFIG_DIR / family / "scheduler.json", model / "scheduler" / "scheduler_config.json"
    )
    (model / "model_index.json").write_text(json.dumps({"_class_name": PIPELINE_CLASS[family]}))
    manifest = {
        "format_version": 1,
        "family": family,
        "dtype": "float32",
        "weights_keep_names": True,
        "lora_slots": {"unet": manifest_entry(rank, sorted(modules))},
    }
    (model / "tcd_ort.json").write_text(json.dumps(manifest))
    return {
        "unet_params": unet_params,
        "modules": len(modules),
        "lora_params": lora_params,
        "lora_mb": lora_file.stat().st_size / 1e6,
        "slot_params": sum(math.prod(shape) for _, shape in slots),
        "model_dir": str(model),
        "lora_file": str(lora_file),
    }


def bench_slots(
    family: str, work: pathlib.Path, exe: str, rank: int, repeats: int
) -> dict[str, Any]:
    out, prep_rss = timed(
        [sys.executable, __file__, "_prepare_slots", family, str(work), str(rank)]
    )
    info = json.loads(out)
    log(
        f"{family}: {info['modules']} slotted modules, "
        f"{info['lora_params'] / 1e6:.1f}M LoRA params ({info['lora_mb']:.0f} MB), "
        f"{info['slot_params'] / 1e6:.1f}M slot params "
        f"(prepare peak RSS {prep_rss:.1f} GiB)"
    )
    walls, rss = [], []
    for _ in range(repeats):
        out, peak = timed([exe, info["model_dir"], info["lora_file"]])
        m = re.search(r"wall_s=([\d.]+) patched=(\d+).* slotted=(\d+)", out)
        if not m:
            raise SystemExit(f"unexpected output of the bench binary: {out}")
        if int(m.group(3)) != info["modules"]:
            raise SystemExit(f"{family}: {m.group(3)} of {info['modules']} modules went into slots")
        walls.append(float(m.group(1)))
        rss.append(peak)
        log(
            f"{family}: tcd-ort slots {walls[-1]:.3f} s, {peak:.2f} GiB ({m.group(2)} replacements)"
        )
    return {**info, "walls": walls, "tcd_wall_s": min(walls), "tcd_rss_gib": max(rss)}


# ------------------------------------------------------------------------------------------------
# the diffusers side (its own process, for its own peak RSS)
# ------------------------------------------------------------------------------------------------


def run_diffusers(unet_dir: str, lora_file: str) -> dict[str, Any]:
    import resource

    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    torch.set_num_threads(os.cpu_count() or 1)
    unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    with torch.no_grad():
        start = time.perf_counter()
        unet.load_lora_adapter(load_file(lora_file), prefix="unet", adapter_name="tcd")
        unet.fuse_lora()
        wall = time.perf_counter() - start
    return {"wall_s": wall, "rss_loaded_gib": rss_loaded}


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def timed(cmd: list[str]) -> tuple[str, float]:
    """Runs `cmd` under `/usr/bin/time -v`; returns its stdout and its peak RSS in GiB."""
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}"
        )
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return p.stdout, (int(m.group(1)) / 2**20 if m else float("nan"))


def bench_binary() -> str:
    p = subprocess.run(
        ["cargo", "bench", "--bench", "lora_apply", "--no-run", "--message-format=json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if p.returncode != 0:
        raise SystemExit(f"cargo bench --no-run failed:\n{p.stderr[-4000:]}")
    for line in p.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "lora_apply":
            if msg.get("executable"):
                return msg["executable"]
    raise SystemExit("cargo did not report the lora_apply bench executable")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        if m:
            cpu = m.group(1).strip()
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {mem_available_gib():.0f} GiB available at start"


def bench_family(
    family: str, work: pathlib.Path, exe: str, rank: int, repeats: int
) -> dict[str, Any]:
    out, prep_rss = timed([sys.executable, __file__, "_prepare", family, str(work), str(rank)])
    info = json.loads(out)
    log(
        f"{family}: {info['modules']} modules, {info['lora_params'] / 1e6:.1f}M LoRA params, "
        f"{info['patched_params'] / 1e9:.3f}B patched of {info['unet_params'] / 1e9:.2f}B "
        f"(prepare peak RSS {prep_rss:.1f} GiB)"
    )
    tcd_walls, tcd_rss, dif_walls, dif_rss, dif_loaded = [], [], [], [], []
    for _ in range(repeats):
        out, rss = timed([exe, info["model_dir"], info["lora_file"]])
        m = re.search(r"wall_s=([\d.]+) patched=(\d+)", out)
        if not m:
            raise SystemExit(f"unexpected output of the bench binary: {out}")
        tcd_walls.append(float(m.group(1)))
        tcd_rss.append(rss)
        log(
            f"{family}: tcd-ort {tcd_walls[-1]:.2f} s, {rss:.2f} GiB ({m.group(2)} weights patched)"
        )
        out, rss = timed(
            [sys.executable, __file__, "_diffusers", info["unet_dir"], info["lora_file"]]
        )
        d = json.loads(out)
        dif_walls.append(d["wall_s"])
        dif_rss.append(rss)
        dif_loaded.append(d["rss_loaded_gib"])
        log(
            f"{family}: diffusers {d['wall_s']:.2f} s, {rss:.2f} GiB "
            f"(UNet alone {d['rss_loaded_gib']:.2f} GiB)"
        )
    out, _ = timed([exe, "--phases", info["model_dir"], info["lora_file"]])
    phases = dict(kv.split("=") for kv in out.split()[1:])
    log(f"{family}: tcd-ort phases, one weight at a time: {phases}")
    return {
        **info,
        "phases": phases,
        "tcd_wall_s": min(tcd_walls),
        "tcd_rss_gib": max(tcd_rss),
        "diffusers_wall_s": min(dif_walls),
        "diffusers_rss_gib": max(dif_rss),
        "diffusers_unet_rss_gib": max(dif_loaded),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_prepare":
        print(json.dumps(prepare(sys.argv[2], pathlib.Path(sys.argv[3]), int(sys.argv[4]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_prepare_slots":
        print(json.dumps(prepare_slots(sys.argv[2], pathlib.Path(sys.argv[3]), int(sys.argv[4]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_diffusers":
        print(json.dumps(run_diffusers(sys.argv[2], sys.argv[3])))
        return
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--families", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    ap.add_argument("--rank", type=int, default=RANK)
    ap.add_argument(
        "--mode",
        choices=("fused", "slots"),
        default="fused",
        help="fused: tcd-ort's fusing beside diffusers' fuse_lora; "
        "slots: tcd-ort filling LoRA slots",
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="runs per side; the table shows the fastest"
    )
    ap.add_argument(
        "--workdir", type=pathlib.Path, default=None, help="default: a temp dir under /tmp"
    )
    args = ap.parse_args()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for f in families:
        if f not in PIPELINE_CLASS:
            ap.error(f"unknown family {f}; choose from {', '.join(PIPELINE_CLASS)}")
    header = f"{datetime.date.today().isoformat()}, {machine()}"
    log("building the bench binary (release profile)")
    exe = bench_binary()
    if args.mode == "slots":
        slot_rows = []
        for family in families:
            work = pathlib.Path(
                tempfile.mkdtemp(prefix=f"tcd-slots-{family}-", dir=args.workdir or "/tmp")
            )
            try:
                slot_rows.append((family, bench_slots(family, work, exe, args.rank, args.repeats)))
            finally:
                shutil.rmtree(work, ignore_errors=True)
        print(f"\nLoRA apply into rank-{args.rank} slots, fp16 LoRA ({header})\n")
        print(
            "| family | modules | LoRA params | slot params | tcd-ort wall (fastest) | all runs "
            "| tcd-ort peak RSS |"
        )
        print("|---|---:|---:|---:|---:|---|---:|")
        for family, r in slot_rows:
            runs = ", ".join(f"{w:.2f}" for w in r["walls"])
            print(
                f"| {family} | {r['modules']} | {r['lora_params'] / 1e6:.1f}M "
                f"| {r['slot_params'] / 1e6:.1f}M "
                f"| {r['tcd_wall_s']:.2f} s | {runs} | {r['tcd_rss_gib']:.2f} GiB |"
            )
        return
    rows = []
    for family in families:
        work = pathlib.Path(
            tempfile.mkdtemp(prefix=f"tcd-lora-{family}-", dir=args.workdir or "/tmp")
        )
        free_disk = shutil.disk_usage(work).free / 2**30
        log(
            f"{family}: working in {work} ({free_disk:.0f} GiB free on disk, "
            f"{mem_available_gib():.1f} GiB memory available)"
        )
        try:
            rows.append((family, bench_family(family, work, exe, args.rank, args.repeats)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nLoRA apply, rank {args.rank}, fp16 LoRA on fp32 UNet ({header})\n")
    print(
        "| family | modules | LoRA params | patched params | tcd-ort wall | tcd-ort peak RSS "
        "| diffusers wall | diffusers peak RSS (UNet alone) | wall ratio diffusers/tcd-ort |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for family, r in rows:
        print(
            f"| {family} | {r['modules']} | {r['lora_params'] / 1e6:.1f}M "
            f"| {r['patched_params'] / 1e9:.3f}B "
            f"| {r['tcd_wall_s']:.2f} s | {r['tcd_rss_gib']:.2f} GiB "
            f"| {r['diffusers_wall_s']:.2f} s | {r['diffusers_rss_gib']:.2f} GiB "
            f"({r['diffusers_unet_rss_gib']:.2f}) "
            f"| {r['diffusers_wall_s'] / r['tcd_wall_s']:.2f} |"
        )
    print("\ntcd-ort phases, one weight at a time (seconds; `lora_apply --phases`):\n")
    print("| family | parse LoRA | read base weights | compute deltas | add | delta+add in place |")
    print("|---|---:|---:|---:|---:|---:|")
    for family, r in rows:
        p = r["phases"]
        print(
            f"| {family} | {p['parse_s']} | {p['read_s']} | {p['delta_s']} | {p['add_s']} "
            f"| {p['delta_and_add_in_place_s']} |"
        )


if __name__ == "__main__":
    main()
