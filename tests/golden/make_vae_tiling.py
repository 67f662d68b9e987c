"""Builds the VAE-tiling fixtures: diffusers' own TCD outputs with `pipe.vae.enable_tiling()` on
the parity fixtures' tiny SD1.5 pipeline, and the tiled and untiled VAE floats behind them.

The engine's `--vae-tiling` must reproduce diffusers' `AutoencoderKL.tiled_decode` and
`_tiled_encode` (tile_sample_min_size = config.sample_size, tile_latent_min_size =
sample_size / 2**(len(block_out_channels) - 1), tile_overlap_factor 0.25, blend_v / blend_h).
The tiny VAE has sample_size 64 and scale factor 2: latents wider or taller than 32 (images over
64 px) are tiled, so small sizes exercise full tiles, partial edge tiles and the threshold.

Run from the repository root with the pinned environment, after make_parity.py (this reuses its
sd15 pipeline and export):

    .venv/bin/python tests/golden/make_vae_tiling.py [OUT_DIR]

OUT_DIR defaults to tests/fixtures/generated/vae_tiling. Everything but the links is rewritten.
Layout (that of make_img2img.py, one family):

    OUT_DIR/images/<name>.png       the img2img input image (RGB)
    OUT_DIR/sd15/diffusers/         a link to parity/sd15/diffusers
    OUT_DIR/sd15/onnx/              a link to parity/sd15/onnx
    OUT_DIR/sd15/cases.json         the requests: the text-to-image fields, for image-to-image
                                    "image" (relative to OUT_DIR) and "strength", and
                                    "vae_tiling": true, "tile_sample_min_size",
                                    "tile_latent_min_size", "tile_overlap_factor" (the VAE's
                                    attributes as diffusers ran), "decode_tiled" (whether the
                                    decode of this size is tiled) and, with an image,
                                    "encode_tiled"
    OUT_DIR/sd15/reference/         <name>.png (<name>_<i>.png for several), <name>.npy (final
                                    latents, as output_type="latent" returns them), <name>.npz
                                    (the intermediates of export/reference.py), and:
        <name>_decoded_tiled.npy    vae.decode(latents / scaling_factor).sample with tiling on,
                                    [b, 3, H, W] float32 (the whole batch in one call, as the
                                    pipeline decodes it); the PNGs are its postprocess
        <name>_decoded_untiled.npy  the same with tiling off
        <name>_moments_tiled.npy    (image cases) vae.encode(image).latent_dist.parameters with
                                    tiling on: mean and log-variance concatenated on channels,
                                    before sampling and clamping (the vae_encoder graph's
                                    `latent_parameters`), [1, 8, H/2, W/2]; `image` is the
                                    preprocessed input (the .npz's `image`, [-1, 1])
        <name>_moments_untiled.npy  the same with tiling off

The tiled arrays are the very tensors the pipeline's decode / encode returned (captured at
AutoencoderKL._decode / _encode); the untiled ones run the same input tensors with tiling off.
The input keeps the pipeline's strides: after an image encode the latents are
channels-last-strided in torch, and a contiguous copy of them (the .npy) decodes ~1e-6 apart
(encode: ~2e-5 of moments up to ~2) through other CPU kernels; the script prints those figures.
Every number the Rust tests compare against comes from diffusers through this script.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PARITY = ROOT / "tests/fixtures/generated/parity"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(ROOT))  # the export package
from make_img2img import PROMPT, link, scene  # noqa: E402

FAMILY = "sd15"


def case(name, seed, size, num_images=1, image=None, strength=None):
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
    if num_images > 1:
        c["num_images"] = num_images
    if image is not None:
        c["image"] = f"images/{image}.png"
        c["strength"] = strength
    c["intermediates"] = True
    return c


CASES = [
    # 64x64 latents: 3x3 decode tiles (the last row and column partial, 16 latents).
    case("t2i_128x128", 500, (128, 128)),
    # 48 latents wide, 80 high: 2 columns (the last 24 latents), 4 rows (the last 8).
    case("t2i_96x160_two_images", 501, (96, 160), num_images=2),
    # The 128x128 input: 3x3 encode tiles (the last 32 px), and tiled decode.
    case("i2i_st0.6_128x128", 502, (128, 128), image="scene_128x128", strength=0.6),
    # 32x32 latents: at the threshold, nothing is tiled.
    case("t2i_64x64_untiled", 503, (64, 64)),
]


def tiling_fields(vae, c):
    """The tiling parameters diffusers ran the case with, and whether each VAE pass tiled."""
    lat = vae.tile_latent_min_size
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    w, h = c["width"], c["height"]
    out = {
        "vae_tiling": True,
        "tile_sample_min_size": int(vae.tile_sample_min_size),
        "tile_latent_min_size": int(lat),
        "tile_overlap_factor": float(vae.tile_overlap_factor),
        "decode_tiled": w // f > lat or h // f > lat,
    }
    if "image" in c:
        out["encode_tiled"] = w > vae.tile_sample_min_size or h > vae.tile_sample_min_size
    return out


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/generated/vae_tiling"
    out = out.resolve()
    from export.cli import _quiet_libraries

    _quiet_libraries()  # before transformers and diffusers are imported
    import torch

    from export.reference import Case, load_reference_pipeline, run_case

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    (out / "images").mkdir(parents=True, exist_ok=True)
    scene(128, 128, 4).save(out / "images/scene_128x128.png")

    base = out / FAMILY
    base.mkdir(parents=True, exist_ok=True)
    src = PARITY / FAMILY
    if not all((src / f).exists() for f in ("diffusers/model_index.json", "onnx/tcd_ort.json")):
        sys.exit(f"{src}: run tests/golden/make_parity.py first (this reuses its models)")
    link(base / "diffusers", src / "diffusers")
    link(base / "onnx", src / "onnx")

    pipe = load_reference_pipeline(str(base / "diffusers"))
    vae = pipe.vae
    vae.enable_tiling()
    cases = [{**c, **tiling_fields(vae, c)} for c in CASES]
    (base / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    ref = base / "reference"
    if ref.exists():
        for old in ref.iterdir():
            old.unlink()
    ref.mkdir(parents=True, exist_ok=True)

    keys = ("name", "prompt", "steps", "eta", "guidance", "seed", "width", "height",
            "num_images", "image", "strength", "intermediates")
    captured = {}

    def capture(key, fn):
        """Wraps vae.`key` (_decode or _encode, below decode / encode and their slicing) to keep
        its last input and output: the tensors the pipeline itself ran, strides included."""

        def wrapped(x, *args, **kwargs):
            out = fn(x, *args, **kwargs)
            y = out if isinstance(out, torch.Tensor) else out[0]
            captured[key] = (x.detach().clone(), y.detach().clone())
            return out

        return wrapped

    def untiled(fn, x):
        vae.disable_tiling()
        try:
            return fn(x)
        finally:
            vae.enable_tiling()

    for c in cases:
        name = c["name"]
        captured.clear()
        for key in ("_decode", "_encode"):
            setattr(vae, key, capture(key, getattr(vae, key)))
        try:
            result = run_case(pipe, Case(**{k: c[k] for k in keys if k in c}), out)
        finally:
            for key in ("_decode", "_encode"):
                delattr(vae, key)
        assert vae.use_tiling
        result.images[0].save(ref / f"{name}.png")
        if len(result.images) > 1:
            for i, image in enumerate(result.images):
                image.save(ref / f"{name}_{i}.png")
        np.save(ref / f"{name}.npy", result.latents)
        np.savez(ref / f"{name}.npz",
                 **{k: v.astype(np.float32) for k, v in result.intermediates.items()})

        # The decode that made the PNGs, and the same input (the pipeline's tensor, whose
        # layout follows the latents': channels-last-strided after an image encode) untiled.
        z, dec_tiled = captured["_decode"]
        assert np.array_equal(z.numpy(), result.latents / np.float32(vae.config.scaling_factor))
        with torch.no_grad():
            dec_untiled = untiled(lambda t: vae.decode(t).sample, z)
            # The same decode from the .npy (contiguous): float noise only, for the report.
            dec_npy = vae.decode(torch.from_numpy(result.latents) / vae.config.scaling_factor)
        tiled = dec_tiled.float().numpy()
        np.save(ref / f"{name}_decoded_tiled.npy", tiled)
        np.save(ref / f"{name}_decoded_untiled.npy", dec_untiled.float().numpy())
        noise = (dec_npy.sample - dec_tiled).abs().max()
        line = (f"{name}: decode {tuple(tiled.shape)} tiled={c['decode_tiled']} "
                f"max|tiled - untiled| = {(dec_tiled - dec_untiled).abs().max():.6g} "
                f"(contiguous re-decode vs pipeline: {noise:.3g})")

        if "image" in c:
            x, m_tiled = captured["_encode"]
            assert np.array_equal(x.numpy(), result.intermediates["image"])
            assert np.array_equal(m_tiled.numpy(), result.intermediates["image_latent_parameters"])
            with torch.no_grad():
                m_untiled = untiled(lambda t: vae.encode(t).latent_dist.parameters, x)
                m_npy = vae.encode(torch.from_numpy(result.intermediates["image"]))
            np.save(ref / f"{name}_moments_tiled.npy", m_tiled.float().numpy())
            np.save(ref / f"{name}_moments_untiled.npy", m_untiled.float().numpy())
            line += (f"; encode {tuple(m_tiled.shape)} tiled={c['encode_tiled']} "
                     f"max|tiled - untiled| = {(m_tiled - m_untiled).abs().max():.6g} "
                     f"(max |moments| {m_tiled.abs().max():.3g}; contiguous re-encode vs "
                     f"pipeline: {(m_npy.latent_dist.parameters - m_tiled).abs().max():.3g})")
        print(line, flush=True)
    print(f"{FAMILY}: {len(cases)} cases, {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
