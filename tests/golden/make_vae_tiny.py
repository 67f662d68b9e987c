"""Builds the tiny-VAE (AutoencoderTiny, TAESD) fixtures: a random-weight AutoencoderTiny that fits
the parity fixtures' tiny SD1.5 pipeline, its `python -m export vae-tiny` export, and diffusers'
own TCD outputs with `pipe.vae` set to it, for text-to-image, image-to-image and inpainting
(4-channel UNet).

Run from the repository root with the pinned environment, after make_parity.py (this reuses its
sd15 pipeline and export):

    .venv/bin/python tests/golden/make_vae_tiny.py [OUT_DIR]

OUT_DIR defaults to tests/fixtures/generated/vae_tiny. The images, cases and references are
always rewritten; the AutoencoderTiny and its export already there are kept. Layout:

    OUT_DIR/diffusers/          the AutoencoderTiny (save_pretrained; latent_channels 4,
                                scaling_factor 1.0, x2 like the tiny pipeline's VAE)
    OUT_DIR/onnx/               `python -m export vae-tiny` of it (vae_decoder/, vae_encoder/,
                                tcd_ort.json)
    OUT_DIR/images/<name>.png   the init image (RGB) and the mask (8-bit grey, white = repaint)
    OUT_DIR/sd15/diffusers/     a link to parity/sd15/diffusers (the pipeline, full VAE)
    OUT_DIR/sd15/onnx/          a link to parity/sd15/onnx (its export)
    OUT_DIR/sd15/cases.json     the requests, with make_img2img.py's fields ("image", "mask",
                                "strength" for image cases; paths relative to OUT_DIR)
    OUT_DIR/sd15/reference/     <name>.png (<name>_<i>.png for several), <name>.npy (final
                                latents, before the VAE) and, for cases with "intermediates",
                                <name>.npz (export/reference.py; image cases carry
                                `image_encoder_latents` / `masked_image_encoder_latents`, the tiny
                                encoder's output, instead of `*_latent_parameters`)

The references come from `python -m export reference --vae-tiny OUT_DIR/diffusers`: the
pipeline of OUT_DIR/sd15/diffusers with TCDScheduler and `pipe.vae` replaced by the
AutoencoderTiny, which diffusers' pipelines (and `from_pipe` for image-to-image and inpainting)
then use to decode and encode. Its encoder has no distribution: nothing is drawn from the
generator for the image latents, unlike with the full VAE.
"""

import json
import os
import sys
from pathlib import Path

from goldenlib import export_cli
from make_img2img import case, rect_mask, scene

ROOT = Path(__file__).resolve().parents[2]
PARITY = ROOT / "tests/fixtures/generated/parity/sd15"
PROMPT = "a photo of an astronaut riding a horse on mars"


def text_case(name, seed, size, **extra):
    c = {
        "name": name,
        "prompt": PROMPT,
        "steps": 4,
        "eta": 0.3,
        "guidance": 0.0,
        "seed": seed,
        "width": size[0],
        "height": size[1],
    }
    c.update(extra)
    return c


def cases():
    return [
        text_case("t2i_s4_e0.3_g0.0_64x64", 0, (64, 64)),
        text_case("t2i_two_images_48x80", 5, (48, 80), num_images=2),
        case("i2i_st0.6_s4_e0.3_g0.0_64x64", 4, 0.3, 0.0, 100, (64, 64), "scene_64x64", 0.6,
             intermediates=True),
        case("inp_st1.0_s4_e0.3_g0.0_rect_64x64", 4, 0.3, 0.0, 300, (64, 64), "scene_64x64", 1.0,
             "mask_rect_64x64", intermediates=True),
        case("inp_st0.7_s4_e0.3_g0.0_rect_64x64", 4, 0.3, 0.0, 301, (64, 64), "scene_64x64", 0.7,
             "mask_rect_64x64", intermediates=True),
    ]


def write_images(out):
    images = {
        "scene_64x64": scene(64, 64, 1),
        "mask_rect_64x64": rect_mask(64, 64, (0.25, 0.3, 0.7, 0.8)),
    }
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(out / "images" / f"{name}.png")



def link(path, target):
    """`path` -> `target` as a relative symlink (replacing an older link)."""
    if path.is_symlink():
        path.unlink()
    if not path.exists():
        path.symlink_to(os.path.relpath(target, path.parent), target_is_directory=True)


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/generated/vae_tiny"
    out = out.resolve()
    if not (PARITY / "diffusers/model_index.json").exists() or not (
        PARITY / "onnx/tcd_ort.json"
    ).exists():
        sys.exit(f"{PARITY}: run tests/golden/make_parity.py first (this reuses its sd15 model)")
    out.mkdir(parents=True, exist_ok=True)
    vae, vae_onnx = out / "diffusers", out / "onnx"
    if not (vae / "config.json").exists():
        export_cli("tiny-vae-tiny", "--vae", PARITY / "diffusers", vae,
            "--overwrite")
    if not (vae_onnx / "tcd_ort.json").exists():
        export_cli("vae-tiny", vae, vae_onnx, "--overwrite")
    write_images(out)
    base = out / "sd15"
    base.mkdir(exist_ok=True)
    link(base / "diffusers", PARITY / "diffusers")
    link(base / "onnx", PARITY / "onnx")
    case_file = base / "cases.json"
    case_file.write_text(json.dumps(cases(), indent=1) + "\n")
    ref = base / "reference"
    if ref.exists():
        for old in ref.iterdir():
            old.unlink()
    export_cli("reference", "--model", base / "diffusers", "--vae-tiny", vae,
        "--cases", case_file, "--image-dir", out, "--out-dir", ref)
    print(f"vae_tiny: {len(cases())} cases", flush=True)


if __name__ == "__main__":
    main()
