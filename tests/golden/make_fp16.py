"""Builds the float16 parity fixtures: a tiny random-weight pipeline per family, its
`python -m export convert --dtype fp16` export, and diffusers' own TCD outputs for a few
requests, once with the text encoder(s) and UNet in float16 (what the export holds) and once
all in float32.

The float16 reference mirrors the export exactly: the text encoder(s) and the UNet loaded with
`torch_dtype=torch.float16`, the VAE with float32 (the export's default), `TCDScheduler` from
the pipeline's config, `torch.Generator("cpu").manual_seed(seed)`. diffusers' pipelines keep the
latents in the UNet's dtype and cannot hand float16 latents to a float32 VAE, so the loop runs
with `output_type="latent"` and the final latents are decoded by the float32 VAE here, as the
engine does: `vae.decode(latents.float() / scaling_factor)`, then the pipeline's own
`image_processor.postprocess`.

diffusers draws its noise directly in float16 (`randn_tensor(..., dtype=torch.float16)`) while the
engine draws float32 noise and rounds it at the graph boundary. torch's CPU generator gives the
same values both ways only when the tensor's element count is a multiple of 16 (its vectorised
normal sampler works in blocks of 16), so every case's latent size is; the script checks it.

Run from the repository root with the pinned environment:

    .venv/bin/python tests/golden/make_fp16.py [OUT_DIR [FAMILY ...]]

OUT_DIR defaults to tests/fixtures/generated/fp16, FAMILY to sd15 sdxl. Layout:

    OUT_DIR/<family>/diffusers/        the random-weight pipeline (save_pretrained)
    OUT_DIR/<family>/onnx/             `python -m export convert --dtype fp16` of it
    OUT_DIR/<family>/cases.json        the requests
    OUT_DIR/<family>/reference/        float16 run: <name>.npy (final latents, as float32),
                                       <name>.png
    OUT_DIR/<family>/reference_fp32/   float32 run: <name>.npy

Every number the Rust fp16 tests compare against comes from diffusers through this script.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from goldenlib import export_cli

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("sd15", "sdxl")


def cases():
    base = "a photo of an astronaut riding a horse on mars"
    return [
        {"name": "s1_e0.3_g0_64x64", "prompt": base, "steps": 1, "eta": 0.3, "guidance": 0.0,
         "seed": 1235, "width": 64, "height": 64},
        {"name": "s4_e0.3_g0_48x80", "prompt": base, "steps": 4, "eta": 0.3, "guidance": 0.0,
         "seed": 1238, "width": 48, "height": 80},
        {"name": "s4_e0.3_g2_64x64", "prompt": base, "negative_prompt": "blurry, low quality",
         "steps": 4, "eta": 0.3, "guidance": 2.0, "seed": 7, "width": 64, "height": 64},
        {"name": "s8_e1.0_g2_64x64", "prompt": "a red cube", "steps": 8, "eta": 1.0,
         "guidance": 2.0, "seed": 11, "width": 64, "height": 64},
    ]



def load(pipe_dir, fp16):
    from diffusers import AutoencoderKL, DiffusionPipeline, TCDScheduler

    dtype = torch.float16 if fp16 else torch.float32
    # The VAE is loaded on its own so float16 never touches its weights.
    vae = AutoencoderKL.from_pretrained(pipe_dir / "vae", torch_dtype=torch.float32)
    pipe = DiffusionPipeline.from_pretrained(pipe_dir, torch_dtype=dtype, vae=vae)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == dtype and pipe.text_encoder.dtype == dtype
    assert pipe.vae.dtype == torch.float32
    return pipe


def check_noise_size(case, pipe):
    f = pipe.vae_scale_factor
    numel = pipe.unet.config.in_channels * (case["height"] // f) * (case["width"] // f)
    if numel % 16:
        raise SystemExit(f"{case['name']}: {numel} latent values, not a multiple of 16")


def reference(pipe, case, out_dir, save_png):
    generator = torch.Generator("cpu").manual_seed(case["seed"])
    with torch.no_grad():
        latents = pipe(
            prompt=case["prompt"],
            negative_prompt=case.get("negative_prompt"),
            num_inference_steps=case["steps"],
            eta=case["eta"],
            guidance_scale=case["guidance"],
            width=case["width"],
            height=case["height"],
            generator=generator,
            output_type="latent",
        ).images
        latents = latents.float()
        np.save(out_dir / f"{case['name']}.npy", latents.numpy())
        if save_png:
            vae = pipe.vae
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            pil = pipe.image_processor.postprocess(image, output_type="pil")[0]
            pil.save(out_dir / f"{case['name']}.png")
    return latents


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/generated/fp16"
    families = sys.argv[2:] or FAMILIES
    torch.set_num_threads(2)
    for family in families:
        base = out / family
        base.mkdir(parents=True, exist_ok=True)
        pipe_dir = base / "diffusers"
        onnx_dir = base / "onnx"
        if not (pipe_dir / "model_index.json").exists():
            export_cli("tiny", "--family", family, pipe_dir)
        if not (onnx_dir / "tcd_ort.json").exists():
            export_cli("convert", pipe_dir, onnx_dir, "--dtype", "fp16",
                "--overwrite")
        family_cases = cases()
        (base / "cases.json").write_text(json.dumps(family_cases, indent=1))
        for fp16, sub in ((True, "reference"), (False, "reference_fp32")):
            pipe = load(pipe_dir, fp16)
            (base / sub).mkdir(exist_ok=True)
            for case in family_cases:
                check_noise_size(case, pipe)
                reference(pipe, case, base / sub, save_png=fp16)
        for case in family_cases:
            a = np.load(base / "reference" / f"{case['name']}.npy")
            b = np.load(base / "reference_fp32" / f"{case['name']}.npy")
            print(f"{family}/{case['name']}: diffusers fp16 vs fp32 latents differ by "
                  f"{np.abs(a - b).max() / np.abs(b).max():.3e} of max", flush=True)


if __name__ == "__main__":
    main()
