"""Builds the LoRA-slot fixtures: tiny SD1.5 and SDXL exports with LoRA slots
(`python -m export convert --lora-slots RANK`), random LoRAs, and diffusers' TCD outputs with
those LoRAs loaded unfused (`load_lora_weights` + `set_adapters`, no `fuse_lora`), which is
what the engine computes with slots.

Run from the repository root with the pinned environment:

    .venv/bin/python tests/golden/make_lora_slots.py [OUT_DIR]

OUT_DIR defaults to tests/fixtures/generated/lora_slots. The base pipelines are the parity
fixtures' (tests/fixtures/generated/parity/<family>/diffusers), built with `python -m export
tiny` if missing. Everything under OUT_DIR/<family> is rewritten. Layout:

    OUT_DIR/<family>/tcd.safetensors      diffusers format, UNet only, on every slotted module
                                          (the TCD LoRA's target modules: attention, feed-forward,
                                          proj_in/out, resnet convs and shortcuts, time_emb_proj,
                                          down/upsampler convs), rank 4, alpha 2 (scale 0.5)
    OUT_DIR/<family>/style.safetensors    kohya format (SD1.5) / kohya with SGM block names
                                          (SDXL), UNet attention/ff/proj/resnet layers and the
                                          text encoders, rank 4, per-component alphas
    OUT_DIR/<family>/slots_r8/            `convert --lora-slots 8`: both LoRAs fit (4 + 4)
    OUT_DIR/sd15/slots_r4/                `convert --lora-slots 4`: modules both LoRAs touch
                                          overflow and the engine fuses them
    OUT_DIR/<family>/cases.json           TCD requests with "loras" (unfused)
    OUT_DIR/<family>/reference/<case>.png/.npy   `python -m export reference` outputs
    OUT_DIR/<family>/index.json           what was written, slot module counts

The LoRA writers are make_lora.py's, so the key formats are the ones the fused LoRA fixtures
test.
"""

import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parents[1]))

import torch  # noqa: E402

from export.lora_slots import TARGET_MODULES  # noqa: E402

import make_lora  # noqa: E402
from goldenlib import export_cli  # noqa: E402

FAMILIES = ("sd15", "sdxl")
RANK = make_lora.RANK
TCD_ALPHA = 2.0
# The overflow (rank-4) export only for SD1.5: which modules overflow and get fused is decided
# per module, the same for every family; SDXL's slots and key formats are covered at rank 8.
SLOT_RANKS = {"sd15": (8, 4), "sdxl": (8,)}
WEIGHTS = (1.0, 0.7)
PROMPT = make_lora.PROMPT


def log(msg):
    print(msg, flush=True)


def slot_modules(unet):
    """The UNet modules `--lora-slots` gives a slot (peft's target matching)."""
    return sorted(
        name
        for name, m in unet.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        and any(name == t or name.endswith("." + t) for t in TARGET_MODULES)
    )


def write_tcd(pipe, modules, path, seed):
    """A UNet-only diffusers-format LoRA on `modules`, as `save_lora_weights` writes it."""
    from peft import LoraConfig

    lora = make_lora.random_lora(pipe, {"unet": modules}, seed, {"unet": TCD_ALPHA})["unet"]
    layers = {}
    for name, (a, b, _) in lora.items():
        layers[f"{name}.lora_A.weight"] = a
        layers[f"{name}.lora_B.weight"] = b
    meta = LoraConfig(r=RANK, lora_alpha=TCD_ALPHA, target_modules=sorted(lora)).to_dict()
    type(pipe).save_lora_weights(
        str(path.parent),
        weight_name=path.name,
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=meta,
    )


def cases(family):
    tcd = {"file": "tcd.safetensors", "weight": WEIGHTS[0]}
    style = {"file": "style.safetensors", "weight": WEIGHTS[1]}
    runs = (
        ("none_g0", [], 0.0),
        ("tcd_g0", [tcd], 0.0),
        ("style_g2", [{"file": "style.safetensors", "weight": 1.0}], 2.0),
        ("tcd_style_g0", [tcd, style], 0.0),
        ("tcd_style_g2", [tcd, style], 2.0),
    )
    return [
        {
            "name": name,
            "prompt": PROMPT,
            "steps": 4,
            "eta": 0.3,
            "guidance": guidance,
            "seed": 1238,
            "width": 64,
            "height": 64,
            "loras": loras,
            "fuse": False,
        }
        for name, loras, guidance in runs
    ]


def make_family(family, out):
    from diffusers import DiffusionPipeline

    t0 = time.perf_counter()
    fam_dir = out / family
    if fam_dir.exists():
        shutil.rmtree(fam_dir)
    fam_dir.mkdir(parents=True)
    src = make_lora.ensure_base(family)
    pipe = DiffusionPipeline.from_pretrained(src, dtype=torch.float32)
    slotted = slot_modules(pipe.unet)
    seed = 5000 + 100 * FAMILIES.index(family)
    write_tcd(pipe, slotted, fam_dir / "tcd.safetensors", seed)
    style = make_lora.random_lora(pipe, make_lora.target_modules(pipe), seed + 1, make_lora.ALPHAS)
    if family == "sdxl":
        names = make_lora.sgm_name(dict(pipe.unet.config))
        make_lora.write_kohya(style, fam_dir / "style.safetensors", family, names)
    else:
        make_lora.write_kohya(style, fam_dir / "style.safetensors", family)
    style_unet = set(style["unet"])
    index = {
        "family": family,
        "base": str(src.relative_to(ROOT.parents[1])),
        "lora_rank": RANK,
        "slot_modules": len(slotted),
        "tcd": {"format": "diffusers", "modules": len(slotted), "alpha": TCD_ALPHA},
        "style": {
            "format": "kohya_sgm" if family == "sdxl" else "kohya",
            "modules": {c: len(m) for c, m in style.items()},
            "alpha": make_lora.ALPHAS,
            "unet_modules_without_slot": sorted(style_unet - set(slotted)),
        },
        "both_in_slot": len(style_unet & set(slotted)),
        "exports": {},
    }
    del pipe
    for rank in SLOT_RANKS[family]:
        name = f"slots_r{rank}"
        secs = export_cli("convert", src, fam_dir / name, "--lora-slots", rank)
        manifest = json.loads((fam_dir / name / "tcd_ort.json").read_text())
        if manifest["lora_slots"]["unet"]["modules"] != slotted:
            raise RuntimeError(f"{family}/{name}: the export slotted other modules than expected")
        index["exports"][name] = {"rank": rank, "modules": len(slotted)}
        log(f"{family}: {name} export in {secs:.1f}s")
    (fam_dir / "cases.json").write_text(json.dumps(cases(family), indent=1) + "\n")
    secs = export_cli("reference", "--model", src, "--cases", fam_dir / "cases.json",
                      "--out-dir", fam_dir / "reference")
    log(f"{family}: references in {secs:.1f}s")
    (fam_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    log(f"{family}: done in {time.perf_counter() - t0:.1f}s")


def main():
    out = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else ROOT.parents[1] / "tests/fixtures/generated/lora_slots"
    )
    if not out.is_absolute():
        out = Path.cwd() / out
    import warnings

    from export.cli import _quiet_libraries

    _quiet_libraries()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    t = time.perf_counter()
    for family in FAMILIES:
        make_family(family, out)
    log(f"wrote {out} in {time.perf_counter() - t:.1f}s")


if __name__ == "__main__":
    main()
