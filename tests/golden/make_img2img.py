"""Builds the image-to-image and inpainting fixtures: procedural test images and masks, tiny
random-weight inpainting pipelines (9-channel UNets) and their ONNX exports, and diffusers' own
TCD outputs for a grid of requests.

Run from the repository root with the pinned environment, after make_parity.py (the sd15 and
sdxl families reuse its pipelines and exports):

    .venv/bin/python tests/golden/make_img2img.py [OUT_DIR [FAMILY ...]]

OUT_DIR defaults to tests/fixtures/generated/img2img, FAMILY to all of sd15 sdxl sd21v sd15-inpaint
sdxl-inpaint. Images and references are always rewritten; pipelines and exports already there
are kept. Layout:

    OUT_DIR/images/<name>.png       the init images (RGB) and masks (8-bit grey, white = repaint)
    OUT_DIR/<family>/diffusers/     the pipeline (sd15, sdxl: a link to parity/<family>/diffusers)
    OUT_DIR/<family>/onnx/          its export (sd15, sdxl: a link to parity/<family>/onnx)
    OUT_DIR/<family>/cases.json     the requests: the text-to-image fields plus "image",
                                    "mask" (inpainting only) and "strength"; image and mask
                                    paths are relative to OUT_DIR
    OUT_DIR/<family>/reference/     <name>.png (<name>_<i>.png for several), <name>.npy (final
                                    latents) and, for cases with "intermediates", <name>.npz

sd15 and sdxl (4-channel UNets) get image-to-image cases (names `i2i_*`) and inpainting cases
that blend latents (`inp_*`); sd15-inpaint and sdxl-inpaint (9-channel UNets) get inpainting
cases. Every case gives its width and height: inpainting passes them to diffusers, image-to-image
resizes the image to them first (see export/reference.py). What each .npz array is is written
in export/reference.py. Every number the Rust tests compare against comes from diffusers through
this script.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from goldenlib import export_cli

ROOT = Path(__file__).resolve().parents[2]
PARITY = ROOT / "tests/fixtures/generated/parity"

FAMILIES = ("sd15", "sdxl", "sd21v", "sd15-inpaint", "sdxl-inpaint")
# Families whose pipeline and export come from make_parity.py.
PARITY_FAMILIES = ("sd15", "sdxl", "sd21v")
PROMPT = "a photo of a red house by a lake at sunset"


# --- test images --------------------------------------------------------------------------


def scene(width, height, seed):
    """A photo-like RGB scene: sky and water gradients, a sun, a house, a tree, film grain.

    Only integer-valued arithmetic on a fixed grid and numpy's PCG64 noise: the bytes are the
    same on every machine.
    """
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / (width - 1), y / (height - 1)
    horizon = 0.55
    img = np.zeros((height, width, 3))
    sky = v < horizon
    t = v / horizon
    img[sky] = np.stack([70 + 150 * t, 110 + 90 * t, 200 - 40 * t], -1)[sky]
    w = (v - horizon) / (1 - horizon)
    img[~sky] = np.stack([30 + 40 * w, 60 + 50 * w, 110 + 30 * w], -1)[~sky]
    # The sun, with a soft halo.
    cx, cy, r = 0.7 * width, 0.3 * height, 0.12 * min(width, height)
    d = np.hypot(x - cx, y - cy)
    halo = np.clip(1 - (d - r) / (1.5 * r), 0, 1)[..., None]
    img = img * (1 - 0.5 * halo) + np.array([255, 210, 120]) * 0.5 * halo
    img[d <= r] = [255, 230, 150]
    # A house: walls, roof, door.
    x0, x1 = int(0.15 * width), int(0.45 * width)
    y0, y1 = int(0.35 * height), int(horizon * height)
    img[y0:y1, x0:x1] = [180, 40, 35]
    half = (x1 - x0) / 2
    roof = (y < y0) & (np.abs(x - (x0 + x1) / 2) <= y - y0 + half)
    img[roof] = [90, 60, 50]
    dx0, dx1 = x0 + (x1 - x0) * 2 // 5, x0 + (x1 - x0) * 3 // 5
    img[y0 + (y1 - y0) // 2 : y1, dx0:dx1] = [60, 35, 20]
    # A tree: trunk and round crown.
    tx = 0.82 * width
    img[(np.abs(x - tx) <= max(1, width // 40)) & (y > 0.42 * height) & (y < horizon * height)] = [
        80,
        50,
        30,
    ]
    crown = np.hypot(x - tx, y - 0.4 * height) <= 0.1 * min(width, height) + 1
    img[crown] = [40, 120, 50]
    # Ripples on the water.
    img[~sky] += (10 * np.sin(u * 40 + v * 7))[..., None][~sky]
    img += np.random.default_rng(seed).normal(0, 6, img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def rect_mask(width, height, box):
    """Binary: 255 inside `box` (fractions x0, y0, x1, y1 of the size), 0 elsewhere."""
    m = np.zeros((height, width), np.uint8)
    x0, y0, x1, y1 = box
    m[int(y0 * height) : int(y1 * height), int(x0 * width) : int(x1 * width)] = 255
    return Image.fromarray(m, "L")


def ellipse_mask(width, height):
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    inside = ((x - 0.45 * width) / (0.3 * width)) ** 2 + ((y - 0.5 * height) / (0.25 * height)) ** 2
    return Image.fromarray(np.where(inside <= 1, 255, 0).astype(np.uint8), "L")


def soft_mask(width, height):
    """Grey levels falling off from the centre, every value 0..255 present near the edge of the
    blob, so binarisation at 0.5 (127 -> 0, 128 -> 1) decides the mask's shape."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    d = np.hypot((x - 0.55 * width) / width, (y - 0.45 * height) / height)
    return Image.fromarray(np.clip(np.rint(255 * (1 - d / 0.45)), 0, 255).astype(np.uint8), "L")


def write_images(out):
    """Name -> (width, height) of every image written to OUT/images."""
    images = {
        "scene_64x64": scene(64, 64, 1),
        "scene_48x80": scene(48, 80, 2),
        # Another size than any case asks for: diffusers resizes it (Lanczos).
        "scene_100x70": scene(100, 70, 3),
        "mask_rect_64x64": rect_mask(64, 64, (0.25, 0.3, 0.7, 0.8)),
        "mask_ellipse_48x80": ellipse_mask(48, 80),
        "mask_soft_64x64": soft_mask(64, 64),
        # Smaller than its image: resized (Lanczos, overshooting at the edges), then binarised.
        "mask_rect_32x32": rect_mask(32, 32, (0.1, 0.2, 0.6, 0.55)),
        "mask_ellipse_100x70": ellipse_mask(100, 70),
    }
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(out / "images" / f"{name}.png")
    return {name: image.size for name, image in images.items()}


# --- cases --------------------------------------------------------------------------------


def case(name, steps, eta, guidance, seed, size, image, strength, mask=None, **extra):
    c = {
        "name": name,
        "prompt": PROMPT,
        "steps": steps,
        "eta": eta,
        "guidance": guidance,
        "seed": seed,
        "width": size[0],
        "height": size[1],
        "image": f"images/{image}.png",
    }
    if mask is not None:
        c["mask"] = f"images/{mask}.png"
    c["strength"] = strength
    c.update(extra)
    return c


def img2img_cases():
    out = []
    n = 0
    for strength in (0.3, 0.75, 0.99, 1.0):
        for steps in (4, 8):
            for eta in (0.0, 0.3):
                size, image = ((64, 64), "scene_64x64") if n % 2 == 0 else ((48, 80), "scene_48x80")
                out.append(
                    case(
                        f"i2i_st{strength}_s{steps}_e{eta}_g0.0_{size[0]}x{size[1]}",
                        steps,
                        eta,
                        0.0,
                        100 + n,
                        size,
                        image,
                        strength,
                        # One debuggable case per strength.
                        intermediates=steps == 4 and eta == 0.3,
                    )
                )
                n += 1
    out += [
        case("i2i_st0.75_s4_e0.3_g2.0_64x64", 4, 0.3, 2.0, 200, (64, 64), "scene_64x64", 0.75,
             intermediates=True),
        case("i2i_st0.99_s8_e0.3_g2.0_negative_48x80", 8, 0.3, 2.0, 201, (48, 80), "scene_48x80",
             0.99, negative_prompt="blurry, low quality"),
        case("i2i_resize_100x70_to_64x48", 4, 0.3, 0.0, 202, (64, 48), "scene_100x70", 0.75,
             intermediates=True),
        case("i2i_two_images", 4, 0.3, 2.0, 203, (64, 64), "scene_64x64", 0.75, num_images=2,
             intermediates=True),
    ]
    return out


def inpaint_cases(family):
    pairs = [
        ((64, 64), "scene_64x64", "mask_rect_64x64"),
        ((48, 80), "scene_48x80", "mask_ellipse_48x80"),
        ((64, 64), "scene_64x64", "mask_soft_64x64"),
    ]
    out = []
    n = 0
    for strength in (0.75, 0.99, 1.0):
        for steps in (4, 8):
            for eta in (0.0, 0.3):
                size, image, mask = pairs[n % len(pairs)]
                out.append(
                    case(
                        f"inp_st{strength}_s{steps}_e{eta}_g0.0_{mask.removeprefix('mask_')}",
                        steps,
                        eta,
                        0.0,
                        300 + n,
                        size,
                        image,
                        strength,
                        mask,
                        intermediates=steps == 4 and eta == 0.3,
                    )
                )
                n += 1
    out += [
        case("inp_st0.75_s4_e0.3_g2.0_rect_64x64", 4, 0.3, 2.0, 400, (64, 64), "scene_64x64",
             0.75, "mask_rect_64x64", intermediates=True),
        case("inp_st1.0_s8_e0.3_g2.0_negative_ellipse_48x80", 8, 0.3, 2.0, 401, (48, 80),
             "scene_48x80", 1.0, "mask_ellipse_48x80", negative_prompt="blurry, low quality"),
        case("inp_mask_32x32_on_64x64", 4, 0.3, 0.0, 402, (64, 64), "scene_64x64", 0.99,
             "mask_rect_32x32", intermediates=True),
        case("inp_resize_100x70_to_64x48", 4, 0.3, 0.0, 403, (64, 48), "scene_100x70", 0.99,
             "mask_ellipse_100x70", intermediates=True),
        case("inp_two_images", 4, 0.3, 2.0, 404, (64, 64), "scene_64x64", 0.99,
             "mask_rect_64x64", num_images=2, intermediates=True),
    ]
    if family == "sdxl-inpaint":
        # The shape of the seed's example: stable-diffusion-xl-1.0-inpainting-0.1 with TCD,
        # 8 steps, no guidance, eta 0.3, strength 0.99.
        out.append(case("inp_seed_example", 8, 0.3, 0.0, 0, (64, 64), "scene_64x64", 0.99,
                        "mask_rect_64x64", intermediates=True))
    return out


def cases(family):
    if family == "sd21v":
        # SD 2.x (v-prediction, "!" padding) takes the SD path; a sample of each grid is enough.
        return img2img_cases()[::4] + inpaint_cases(family)[::4]
    if family in PARITY_FAMILIES:
        return img2img_cases() + inpaint_cases(family)
    return inpaint_cases(family)


# --- driver -------------------------------------------------------------------------------



def link(path, target):
    """`path` -> `target` as a relative symlink (replacing an older link)."""
    if path.is_symlink():
        path.unlink()
    if not path.exists():
        path.symlink_to(os.path.relpath(target, path.parent), target_is_directory=True)


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/generated/img2img"
    out = out.resolve()
    families = sys.argv[2:] or FAMILIES
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        sys.exit(f"unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    t0 = time.perf_counter()
    sizes = write_images(out)
    print("images:", ", ".join(f"{k} {w}x{h}" for k, (w, h) in sizes.items()), flush=True)
    for family in families:
        base = out / family
        base.mkdir(parents=True, exist_ok=True)
        pipe, onnx_dir = base / "diffusers", base / "onnx"
        if family in PARITY_FAMILIES:
            src = PARITY / family
            if not (src / "diffusers/model_index.json").exists() or not (
                src / "onnx/tcd_ort.json"
            ).exists():
                sys.exit(f"{src}: run tests/golden/make_parity.py first (this reuses its models)")
            link(pipe, src / "diffusers")
            link(onnx_dir, src / "onnx")
        else:
            if not (pipe / "model_index.json").exists():
                export_cli("tiny", "--family", family, pipe, "--overwrite")
            if not (onnx_dir / "tcd_ort.json").exists():
                export_cli("convert", pipe, onnx_dir, "--overwrite")
        case_file = base / "cases.json"
        case_file.write_text(json.dumps(cases(family), indent=1) + "\n")
        ref = base / "reference"
        if ref.exists():
            for old in ref.iterdir():
                old.unlink()
        export_cli("reference", "--model", pipe, "--cases", case_file,
            "--image-dir", out, "--out-dir", ref)
        print(f"{family}: {len(cases(family))} cases, {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
