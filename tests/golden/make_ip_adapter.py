"""Builds the IP-Adapter fixtures (issue #20): procedural reference images, tiny random-weight
plain and plus IP-Adapters per family and their ONNX exports, a TCD-style LoRA, and diffusers'
own TCD outputs with an IP-Adapter for text-to-image, image-to-image, inpainting, a LoRA and
(SD1.5) a ControlNet.

Run from the repository root with the pinned environment, after make_parity.py (this reuses its
sd15 and sdxl pipelines and exports, whose UNets must take the IP-Adapter inputs) and
make_controlnet.py (the SD1.5 ControlNet case uses its controlnet_0):

    .venv/bin/python tests/golden/make_ip_adapter.py [OUT_DIR [FAMILY ...]]

OUT_DIR defaults to tests/fixtures/generated/ip_adapter, FAMILY to both of sd15 sdxl. Images,
the LoRA, cases and references are always rewritten; adapters and exports already there are
kept. Layout:

    OUT_DIR/images/<name>.png            IP-Adapter reference images (RGB) of sizes and aspect
                                         ratios no output has, so the CLIP preprocessing's
                                         resize and centre crop matter: ref_scene_100x70 (a
                                         landscape photo-like scene), ref_pattern_53x91 (a
                                         portrait of stripes, rings and noise); scene_64x64
                                         and mask_rect_64x64 (image-to-image, inpainting),
                                         edges_64x64 (the ControlNet's control image)
    OUT_DIR/<family>/diffusers/          the pipeline (a link to parity/<family>/diffusers)
    OUT_DIR/<family>/onnx/               its export (a link to parity/<family>/onnx)
    OUT_DIR/<family>/ip_<variant>/source the tiny adapter (`python -m export tiny-ip-adapter
                                         --variant <variant> --seed <0 plain, 1 plus>`), laid
                                         out like h94/IP-Adapter: models/<weight name> and
                                         models/image_encoder/
    OUT_DIR/<family>/ip_<variant>/onnx   its `python -m export ip-adapter` export
    OUT_DIR/<family>/tcd_lora.safetensors  a random TCD-style LoRA (diffusers format, UNet only,
                                         make_lora_slots.py's writer and modules)
    OUT_DIR/sd15/controlnet_0            a link to controlnet/sd15/controlnet_0 (diffusers/,
                                         onnx/)
    OUT_DIR/<family>/cases.json          the requests: the text-to-image fields plus
                                         "ip_adapter": {"path", "subfolder", "weight_name",
                                         "onnx"} (directories relative to the cases file: the
                                         source diffusers loads and the export the engine
                                         runs), "ip_adapter_image" (relative to OUT_DIR) and
                                         "ip_adapter_scale"; LoRA cases add "loras": [{"file",
                                         "weight"}] and "fuse": false as the LoRA fixtures do,
                                         image-to-image and inpainting cases "image", "mask"
                                         and "strength" as the img2img fixtures do, the
                                         ControlNet case "controlnets" and "control_images" as
                                         the ControlNet fixtures do
    OUT_DIR/<family>/reference/          <name>.png (<name>_<i>.png for several), <name>.npy
                                         (final latents), <name>.npz for cases with
                                         "intermediates"

Every case runs TCDScheduler, 4 steps, eta 0.3, at 64x64. What each field and .npz array means
is written in export/reference.py and export/reference_ip.py (`ip_pixel_values`,
`ip_image_embeds`, `noise_pred_0`). Every number the Rust tests compare against comes from
diffusers through this script.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(ROOT))  # the export package
from goldenlib import export_cli  # noqa: E402
from make_controlnet import edges  # noqa: E402
from make_img2img import link, rect_mask, scene  # noqa: E402

GENERATED = ROOT / "tests/fixtures/generated"
PARITY = GENERATED / "parity"
CONTROLNET = GENERATED / "controlnet"
FAMILIES = ("sd15", "sdxl")
VARIANTS = {"plain": 0, "plus": 1}  # variant -> tiny adapter seed
PROMPT = "a photo of a red house by a lake at sunset"
NEGATIVE = "blurry, low quality"
LORA = "tcd_lora.safetensors"
LORA_SEED = {"sd15": 7000, "sdxl": 7100}


# --- images -------------------------------------------------------------------------------


def pattern(width, height, seed):
    """A portrait test card: diagonal colour stripes, concentric rings and numpy PCG64 noise,
    detail at every scale so the resize filter shows in the pixels."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.stack(
        [
            128 + 100 * np.sin((x + 2 * y) / 3.0),
            128 + 100 * np.cos((2 * x - y) / 5.0),
            255 * y / (height - 1),
        ],
        -1,
    )
    rings = np.hypot(x - 0.4 * width, y - 0.6 * height)
    img[np.sin(rings / 2.0) > 0.6] = [240, 240, 40]
    img += np.random.default_rng(seed).normal(0, 8, img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def write_images(out):
    images = {
        "ref_scene_100x70": scene(100, 70, 11),
        "ref_pattern_53x91": pattern(53, 91, 12),
        "scene_64x64": scene(64, 64, 1),
        "mask_rect_64x64": rect_mask(64, 64, (0.25, 0.3, 0.7, 0.8)),
        "edges_64x64": edges(64, 64, 1),
    }
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(out / "images" / f"{name}.png")
    return {name: image.size for name, image in images.items()}


# --- cases --------------------------------------------------------------------------------


def adapter(variant):
    from export.tiny_ip_adapter import TINY_SUBFOLDER, TINY_WEIGHT_NAMES

    return {
        "path": f"ip_{variant}/source",
        "subfolder": TINY_SUBFOLDER,
        "weight_name": TINY_WEIGHT_NAMES[variant],
        "onnx": f"ip_{variant}/onnx",
    }


def case(name, variant, scale, guidance, seed, ref, **extra):
    c = {
        "name": name,
        "prompt": PROMPT,
        "steps": 4,
        "eta": 0.3,
        "guidance": guidance,
        "seed": seed,
        "width": 64,
        "height": 64,
        "ip_adapter": adapter(variant),
        "ip_adapter_image": f"images/ref_{ref}.png",
        "ip_adapter_scale": scale,
    }
    c.update(extra)
    return c


def cases(family):
    """Grouped by adapter: the reference runner loads each once."""
    landscape, portrait = "scene_100x70", "pattern_53x91"
    out = [
        # Scale 0 is the plain UNet's output (the branch adds nothing); 0.5 and 1 move it.
        case("plain_sc0.0_g0", "plain", 0.0, 0.0, 700, landscape),
        case("plain_sc0.5_g0", "plain", 0.5, 0.0, 701, landscape, intermediates=True),
        case("plain_sc1.0_g0", "plain", 1.0, 0.0, 702, portrait),
        # Guidance: the unconditional half projects zeros.
        case("plain_sc0.5_g3_negative", "plain", 0.5, 3.0, 703, portrait,
             negative_prompt=NEGATIVE, intermediates=True),
        case("plain_sc0.5_g3_negative_two_images", "plain", 0.5, 3.0, 704, landscape,
             negative_prompt=NEGATIVE, num_images=2, intermediates=True),
        # A TCD-style LoRA at weight 1 (the engine: --lora tcd_lora.safetensors:1.0).
        case("plain_sc1.0_g0_lora", "plain", 1.0, 0.0, 705, portrait,
             loras=[{"file": LORA, "weight": 1.0}], fuse=False),
        case("plain_sc0.5_g0_img2img", "plain", 0.5, 0.0, 706, portrait,
             image="images/scene_64x64.png", strength=0.75, intermediates=True),
        case("plain_sc0.5_g3_inpaint", "plain", 0.5, 3.0, 707, landscape,
             image="images/scene_64x64.png", mask="images/mask_rect_64x64.png", strength=0.99),
    ]
    if family == "sd15":
        out.append(
            case("plain_sc0.5_g0_controlnet", "plain", 0.5, 0.0, 708, portrait,
                 controlnets=[{"path": "controlnet_0/diffusers", "onnx": "controlnet_0/onnx",
                               "scale": 1.0}],
                 control_images=["images/edges_64x64.png"])
        )
    out += [
        case("plus_sc0.5_g0", "plus", 0.5, 0.0, 720, landscape, intermediates=True),
        # Guidance: the unconditional half encodes an all-zero image.
        case("plus_sc1.0_g3_negative", "plus", 1.0, 3.0, 721, portrait,
             negative_prompt=NEGATIVE, intermediates=True),
    ]
    return out


# --- driver -------------------------------------------------------------------------------


def check_inputs(family):
    src = PARITY / family
    manifest = src / "onnx/tcd_ort.json"
    if not (src / "diffusers/model_index.json").exists() or not manifest.exists():
        sys.exit(f"{src}: run tests/golden/make_parity.py first (this reuses its models)")
    unet = json.loads(manifest.read_text())["components"]["unet"]["inputs"]
    if "ip_key_0" not in unet:
        sys.exit(
            f"{src}/onnx: its UNet has no IP-Adapter inputs (an older export); run\n"
            f"  .venv/bin/python tests/golden/make_parity.py {PARITY} {family}\n"
            "which re-exports it"
        )
    if family == "sd15" and not (CONTROLNET / "sd15/controlnet_0/onnx/tcd_ort.json").exists():
        sys.exit(f"{CONTROLNET}: run tests/golden/make_controlnet.py first (its controlnet_0)")
    return src


def make_family(out, family):
    t0 = time.perf_counter()
    import torch
    from diffusers import DiffusionPipeline

    from export.ip_adapter import export_ip_adapter
    from export.tiny_ip_adapter import TINY_SUBFOLDER, TINY_WEIGHT_NAMES, build_tiny_ip_adapter

    import make_lora_slots

    base = out / family
    base.mkdir(parents=True, exist_ok=True)
    src = check_inputs(family)
    link(base / "diffusers", src / "diffusers")
    link(base / "onnx", src / "onnx")
    if family == "sd15":
        link(base / "controlnet_0", CONTROLNET / "sd15/controlnet_0")
    # In this process rather than through `python -m export tiny-ip-adapter` / `ip-adapter`
    # (the same functions; export/tests runs the commands): four fewer torch start-ups.
    for variant, seed in VARIANTS.items():
        d = base / f"ip_{variant}"
        weights = d / "source" / TINY_SUBFOLDER / TINY_WEIGHT_NAMES[variant]
        if not weights.exists():
            print(f"+ tiny {variant} IP-Adapter {d / 'source'} (seed {seed})", flush=True)
            build_tiny_ip_adapter(base / "diffusers", d / "source", variant, seed=seed)
        if not (d / "onnx/tcd_ort.json").exists():
            print(f"+ export {d / 'onnx'}", flush=True)
            export_ip_adapter(str(d / "source"), d / "onnx", subfolder=TINY_SUBFOLDER,
                              weight_name=TINY_WEIGHT_NAMES[variant], overwrite=True)
    print(f"{family}: adapters {time.perf_counter() - t0:.0f}s", flush=True)
    pipe = DiffusionPipeline.from_pretrained(base / "diffusers", dtype=torch.float32)
    make_lora_slots.write_tcd(pipe, make_lora_slots.slot_modules(pipe.unet), base / LORA,
                              LORA_SEED[family])
    del pipe
    case_file = base / "cases.json"
    case_file.write_text(json.dumps(cases(family), indent=1) + "\n")
    ref = base / "reference"
    if ref.exists():
        for old in ref.iterdir():
            old.unlink()
    export_cli("reference", "--model", base / "diffusers", "--cases", case_file,
               "--image-dir", out, "--out-dir", ref)


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else GENERATED / "ip_adapter"
    out = out.resolve()
    families = sys.argv[2:] or FAMILIES
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        sys.exit(f"unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    from export.cli import _quiet_libraries

    _quiet_libraries()  # before transformers and diffusers are imported
    import torch

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    sizes = write_images(out)
    print("images:", ", ".join(f"{k} {w}x{h}" for k, (w, h) in sizes.items()), flush=True)
    for family in families:
        make_family(out, family)
        print(f"{family}: {len(cases(family))} cases, {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
