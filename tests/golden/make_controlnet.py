"""Builds the ControlNet fixtures: procedural control images, two tiny random-weight
ControlNets per family (ControlNetModel.from_unet of the parity pipelines' UNets) and their ONNX
exports, and diffusers' own TCD ControlNet outputs for a grid of text-to-image requests.

Run from the repository root with the pinned environment, after make_parity.py (this reuses its
sd15 and sdxl pipelines and exports, whose UNets must take the ControlNet residual inputs):

    .venv/bin/python tests/golden/make_controlnet.py [OUT_DIR [FAMILY ...]]
    .venv/bin/python tests/golden/make_controlnet.py --demo-image models/control-edges-64x64.png

OUT_DIR defaults to tests/fixtures/generated/controlnet, FAMILY to both of sd15 sdxl. Images,
cases and references are always rewritten; ControlNets and exports already there are kept. The
ControlNets of both families are always built (each family's bad-input case uses the other's).
Layout:

    OUT_DIR/images/<name>.png              control images (RGB): line drawings (edges_*),
                                           smooth depth-like gradients (depth_*), a photo-like
                                           scene for the canny cases (scene_*) and images of
                                           another size than any output (*_100x70), which the
                                           pipeline resizes
    OUT_DIR/<family>/diffusers/            the pipeline (a link to parity/<family>/diffusers)
    OUT_DIR/<family>/onnx/                 its export (a link to parity/<family>/onnx)
    OUT_DIR/<family>/controlnet_<k>/diffusers  tiny ControlNet k (k = 0, 1; seed k)
    OUT_DIR/<family>/controlnet_<k>/onnx       its `python -m export controlnet` export
    OUT_DIR/<family>/controlnet_other/onnx     a link to the other family's controlnet_0/onnx:
                                           a ControlNet the engine must refuse for this family
    OUT_DIR/<family>/cases.json            the requests: the text-to-image fields plus
                                           "controlnets" ([{"path", "onnx", "scale"}], paths
                                           relative to the cases file), "control_images" (one
                                           per ControlNet, relative to OUT_DIR), optional
                                           "control_start" / "control_end" and
                                           "control_preprocess": "canny"
    OUT_DIR/<family>/reference/            <name>.png (<name>_<i>.png for several), <name>.npy
                                           (final latents), <name>.npz for cases with
                                           "intermediates", <name>_control_<i>.png (the
                                           pipeline's control image) for canny cases

What each field and .npz array means is written in export/reference.py. Every number the Rust
tests compare against comes from diffusers through this script.
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
sys.path.insert(1, str(ROOT))  # the export package, for the ControlNets
from goldenlib import export_cli  # noqa: E402
from make_img2img import link, scene  # noqa: E402

PARITY = ROOT / "tests/fixtures/generated/parity"
FAMILIES = ("sd15", "sdxl")
PROMPT = "a photo of a red house by a lake at sunset"
N_CONTROLNETS = 2


# --- control images -----------------------------------------------------------------------


def edges(width, height, seed):
    """A line drawing like a scribble or edge map: white 1-2 px lines (rectangles, a circle,
    diagonals) on black, positions drawn from numpy's PCG64 so each seed differs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    on = np.zeros((height, width), bool)
    for _ in range(3):
        x0, x1 = sorted(rng.integers(1, width - 1, 2))
        y0, y1 = sorted(rng.integers(1, height - 1, 2))
        inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        ring = (x >= x0 + 1) & (x <= x1 - 1) & (y >= y0 + 1) & (y <= y1 - 1)
        on |= inside & ~ring
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    r = rng.uniform(0.15, 0.3) * min(width, height)
    on |= np.abs(np.hypot(x - cx, y - cy) - r) < 0.8
    a = rng.uniform(0.5, 2.0)
    on |= np.abs(y - a * x - rng.uniform(-0.5, 0.5) * height) < 0.9
    grey = np.where(on, 255, 0).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, -1), "RGB")


def depth(width, height, seed):
    """A depth-map-like image: a floor gradient with a few smooth blobs nearer the camera."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    d = 40 + 120 * y / (height - 1)
    for _ in range(3):
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        s = rng.uniform(0.1, 0.25) * min(width, height)
        d += rng.uniform(60, 110) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    grey = np.clip(np.rint(d), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, -1), "RGB")


def write_images(out):
    images = {
        "edges_64x64": edges(64, 64, 1),
        "edges_48x80": edges(48, 80, 2),
        "depth_64x64": depth(64, 64, 3),
        "depth_48x80": depth(48, 80, 4),
        "scene_64x64": scene(64, 64, 5),
        # Another size than any case asks for: the pipeline resizes them (Lanczos).
        "edges_100x70": edges(100, 70, 6),
        "scene_100x70": scene(100, 70, 7),
    }
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(out / "images" / f"{name}.png")
    return {name: image.size for name, image in images.items()}


# --- cases --------------------------------------------------------------------------------


def net(k, scale):
    return {"path": f"controlnet_{k}/diffusers", "onnx": f"controlnet_{k}/onnx", "scale": scale}


def case(name, steps, eta, guidance, seed, size, nets, images, **extra):
    c = {
        "name": name,
        "prompt": PROMPT,
        "steps": steps,
        "eta": eta,
        "guidance": guidance,
        "seed": seed,
        "width": size[0],
        "height": size[1],
        "controlnets": nets,
        "control_images": [f"images/{i}.png" for i in images],
    }
    c.update(extra)
    return c


def cases(family):
    out = []
    n = 0
    # The grid, sampled: every scale x guidance x eta, steps and sizes cycling through it.
    for scale in (0.5, 1.0):
        for guidance in (0.0, 2.0):
            for eta in (0.0, 0.3):
                steps = (1, 4, 8)[n % 3]
                size = ((64, 64), (48, 80))[n % 2]
                image = ("edges", "depth")[(n // 2) % 2] + f"_{size[0]}x{size[1]}"
                out.append(
                    case(
                        f"cn_sc{scale}_s{steps}_e{eta}_g{guidance}_{size[0]}x{size[1]}",
                        steps,
                        eta,
                        guidance,
                        500 + n,
                        size,
                        [net(0, scale)],
                        [image],
                        intermediates=n % 4 == 1,
                    )
                )
                n += 1
    edges64 = ["edges_64x64"]
    out += [
        # Guidance windows: the ControlNet only for the first half, or from a quarter on.
        case("cn_window_0.0_0.5", 4, 0.3, 0.0, 600, (64, 64), [net(0, 1.0)], edges64,
             control_start=[0.0], control_end=[0.5], intermediates=True),
        case("cn_window_0.25_1.0", 4, 0.3, 2.0, 601, (64, 64), [net(0, 1.0)], edges64,
             control_start=[0.25], control_end=[1.0]),
        # Two ControlNets, two images, scales [0.5, 1.0]: the residuals are summed.
        case("cn_multi_g0", 4, 0.3, 0.0, 610, (64, 64), [net(0, 0.5), net(1, 1.0)],
             ["edges_64x64", "depth_64x64"]),
        case("cn_multi_g2_48x80", 4, 0.3, 2.0, 611, (48, 80), [net(0, 0.5), net(1, 1.0)],
             ["edges_48x80", "depth_48x80"]),
        case("cn_multi_windows", 4, 0.3, 2.0, 612, (64, 64), [net(0, 0.5), net(1, 1.0)],
             ["edges_64x64", "depth_64x64"], control_start=[0.0, 0.25],
             control_end=[0.5, 1.0], intermediates=True),
        # diffusers' canny preprocessing of a photo, default and custom thresholds.
        case("cn_canny", 4, 0.3, 0.0, 620, (64, 64), [net(0, 1.0)], ["scene_64x64"],
             control_preprocess="canny", intermediates=True),
        case("cn_canny_50_150_resize", 4, 0.3, 2.0, 621, (64, 48), [net(1, 0.5)],
             ["scene_100x70"], control_preprocess="canny", canny_low=50, canny_high=150),
        case("cn_two_images", 4, 0.3, 2.0, 630, (64, 64), [net(0, 1.0)], edges64,
             num_images=2),
        case("cn_negative_prompt", 4, 0.3, 2.0, 640, (48, 80), [net(1, 1.0)], ["depth_48x80"],
             negative_prompt="blurry, low quality"),
        # The control image is 100x70, the output 64x48: the pipeline resizes it.
        case("cn_resize_100x70_to_64x48", 4, 0.3, 0.0, 650, (64, 48), [net(0, 1.0)],
             ["edges_100x70"], intermediates=True),
    ]
    if family == "sdxl":
        # The shape of the seed's example: an SDXL ControlNet with TCD, 4 steps, no guidance,
        # eta 0.3, conditioning scale 0.5.
        out.append(case("cn_seed_example", 4, 0.3, 0.0, 0, (64, 64), [net(0, 0.5)], edges64,
                        intermediates=True))
    return out


# --- driver -------------------------------------------------------------------------------



def check_parity(family):
    src = PARITY / family
    manifest = src / "onnx/tcd_ort.json"
    if not (src / "diffusers/model_index.json").exists() or not manifest.exists():
        sys.exit(f"{src}: run tests/golden/make_parity.py first (this reuses its models)")
    unet = json.loads(manifest.read_text())["components"]["unet"]["inputs"]
    if "mid_block_additional_residual" not in unet:
        sys.exit(
            f"{src}/onnx: its UNet has no ControlNet residual inputs (an older export); run\n"
            f"  .venv/bin/python tests/golden/make_parity.py {PARITY} {family}\n"
            "which re-exports it"
        )
    return src


def controlnets(out, family):
    """Build and export the family's tiny ControlNets unless they are there already.

    In this process rather than through `python -m export tiny-controlnet` / `controlnet` (the
    same functions; export/tests runs the commands): four fewer torch start-ups.
    """
    base = out / family
    base.mkdir(parents=True, exist_ok=True)
    src = check_parity(family)
    link(base / "diffusers", src / "diffusers")
    link(base / "onnx", src / "onnx")
    for k in range(N_CONTROLNETS):
        d = base / f"controlnet_{k}"
        if not (d / "diffusers/config.json").exists():
            from export.controlnet import build_tiny_controlnet

            print(f"+ tiny ControlNet {d / 'diffusers'} (seed {k})", flush=True)
            build_tiny_controlnet(base / "diffusers", d / "diffusers", seed=k)
        if not (d / "onnx/tcd_ort.json").exists():
            from export.cli import _quiet_libraries
            from export.controlnet import export_controlnet

            print(f"+ export {d / 'onnx'}", flush=True)
            _quiet_libraries()
            export_controlnet(str(d / "diffusers"), d / "onnx", overwrite=True)


def main():
    if sys.argv[1:2] == ["--demo-image"]:
        # The demo's control image, models/control-edges-64x64.png (see models/README.md).
        if len(sys.argv) != 3:
            sys.exit("usage: make_controlnet.py --demo-image PATH.png")
        edges(64, 64, 1).save(sys.argv[2])
        return
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/generated/controlnet"
    out = out.resolve()
    families = sys.argv[2:] or FAMILIES
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        sys.exit(f"unknown family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    t0 = time.perf_counter()
    sizes = write_images(out)
    print("images:", ", ".join(f"{k} {w}x{h}" for k, (w, h) in sizes.items()), flush=True)
    for family in FAMILIES:
        controlnets(out, family)
    for family in FAMILIES:
        other = FAMILIES[1 - FAMILIES.index(family)]
        (out / family / "controlnet_other").mkdir(exist_ok=True)
        link(out / family / "controlnet_other/onnx", out / other / "controlnet_0/onnx")
    print(f"controlnets: {time.perf_counter() - t0:.0f}s", flush=True)
    for family in families:
        base = out / family
        case_file = base / "cases.json"
        case_file.write_text(json.dumps(cases(family), indent=1) + "\n")
        ref = base / "reference"
        if ref.exists():
            for old in ref.iterdir():
                old.unlink()
        export_cli("reference", "--model", base / "diffusers", "--cases",
            case_file, "--image-dir", out, "--out-dir", ref)
        print(f"{family}: {len(cases(family))} cases, {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
