"""Builds the depth fixtures: a tiny random-weight hybrid DPT exported with `python -m export
depth`, procedural photo-like images, and for each (image, output size) what diffusers'
ControlNet-depth guide computes with transformers and torch.

Run from the repository root with the pinned environment:

    .venv/bin/python tests/golden/make_depth.py [OUT_DIR]

OUT_DIR defaults to tests/fixtures/generated/depth. Everything is rewritten. Layout:

    OUT_DIR/source/                  the tiny DPTForDepthEstimation (save_pretrained)
    OUT_DIR/model/                   its export: model.onnx, preprocessor_config.json, tcd_ort.json
    OUT_DIR/images/<image>.png       RGB inputs
    OUT_DIR/ref/<image>_pixel_values.npy     the image processor's pixel_values [1, 3, h, w]
    OUT_DIR/ref/<image>_predicted_depth.npy  the torch model's predicted_depth [1, h, w]
    OUT_DIR/ref/<case>.png           the guide's get_depth_map at the case's size (RGB)
    OUT_DIR/preprocessors/<name>/preprocessor_config.json   other processor settings
    OUT_DIR/ref/<name>_<image>_pixel_values.npy             their pixel_values
    OUT_DIR/cases.json               everything above, plus Pillow and torch resize cases

The image processor is transformers' PIL `DPTImageProcessor` (`DPTImageProcessorPil` in
transformers 5, where `DPTImageProcessor` names the torchvision one when torchvision is
installed); the guide predates that split and used the PIL one. The tiny model's processor has
dpt-hybrid-midas's settings (BILINEAR, no aspect ratio kept, mean = std = 0.5) at 64x64 instead
of 384x384; the extra processors cover BICUBIC, LANCZOS and keep_aspect_ratio with
ensure_multiple_of. Every number comes from Pillow, transformers or torch through this script.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from export.depth import build_tiny_depth, convert_depth, image_processor_class  # noqa: E402

from make_canny import scene  # noqa: E402

# (name, width, height, seed): downscaled on both axes, on one axis, upscaled, and the
# processor's own size (a copy in Pillow).
IMAGES = [
    ("photo200x150", 200, 150, 11),
    ("photo97x64", 97, 64, 12),
    ("photo40x52", 40, 52, 13),
    ("photo64", 64, 64, 14),
]
# (image, width, height) of the control image: up, down, non-square, the guide's 1024x1024.
CASES = [
    ("photo200x150", 96, 72),
    ("photo200x150", 1024, 1024),
    ("photo97x64", 33, 50),
    ("photo40x52", 128, 80),
    ("photo64", 64, 64),
]
# Other processor settings, for pixel_values only (the exported graph takes 64x64).
PREPROCESSORS = {
    "bicubic": {"resample": 3},
    "lanczos": {"resample": 1},
    "keep_aspect_bicubic": {"resample": 3, "keep_aspect_ratio": True, "ensure_multiple_of": 32},
}

# Small resizes to check the Rust resamplers one filter at a time: (in_w, in_h, out_w, out_h).
RESIZES = [(5, 4, 3, 4), (5, 4, 5, 9), (7, 5, 3, 2), (4, 3, 9, 7), (6, 6, 4, 10)]
PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# torch bicubic planes: (in_w, in_h, out_w, out_h).
INTERPOLATIONS = [(3, 2, 7, 5), (5, 4, 2, 3), (4, 4, 4, 4), (2, 3, 9, 1), (6, 5, 11, 13)]


def get_depth_map(image, feature_extractor, depth_estimator, height, width):
    """diffusers' ControlNet-depth guide, with the output size as parameters."""
    image = feature_extractor(images=image, return_tensors="pt").pixel_values
    with torch.no_grad():
        depth_map = depth_estimator(image).predicted_depth
    depth_map = torch.nn.functional.interpolate(
        depth_map.unsqueeze(1), size=(height, width), mode="bicubic", align_corners=False
    )
    depth_min = torch.amin(depth_map, dim=[1, 2, 3], keepdim=True)
    depth_max = torch.amax(depth_map, dim=[1, 2, 3], keepdim=True)
    depth_map = (depth_map - depth_min) / (depth_max - depth_min)
    image = torch.cat([depth_map] * 3, dim=1)
    image = image.permute(0, 2, 3, 1).cpu().numpy()[0]
    return Image.fromarray((image * 255.0).clip(0, 255).astype(np.uint8))


def main():
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/generated/depth"
    for sub in ("images", "ref", "preprocessors"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    source = build_tiny_depth(out / "source", seed=0)
    convert_depth(str(source), out / "model", overwrite=True)

    from transformers import DPTForDepthEstimation

    processor_class = image_processor_class()
    feature_extractor = processor_class.from_pretrained(out / "model")
    depth_estimator = DPTForDepthEstimation.from_pretrained(source).eval()

    images = {}
    for name, width, height, seed in IMAGES:
        Image.fromarray(scene(width, height, seed), "RGB").save(out / "images" / f"{name}.png")
        # Read back, so the references come from the exact bytes the Rust test loads.
        image = Image.open(out / "images" / f"{name}.png").convert("RGB")
        images[name] = image
        pixel_values = feature_extractor(images=image, return_tensors="pt").pixel_values
        with torch.no_grad():
            depth = depth_estimator(pixel_values).predicted_depth
        np.save(out / "ref" / f"{name}_pixel_values.npy", pixel_values.numpy())
        np.save(out / "ref" / f"{name}_predicted_depth.npy", depth.numpy())

    cases = []
    for name, width, height in CASES:
        case = f"{name}_to_{width}x{height}"
        get_depth_map(images[name], feature_extractor, depth_estimator, height, width).save(
            out / "ref" / f"{case}.png"
        )
        cases.append(
            {
                "name": case,
                "image": f"images/{name}.png",
                "width": width,
                "height": height,
                "pixel_values": f"ref/{name}_pixel_values.npy",
                "predicted_depth": f"ref/{name}_predicted_depth.npy",
                "depth_map": f"ref/{case}.png",
            }
        )

    preprocessors = []
    base = feature_extractor.to_dict()
    for pname, changes in PREPROCESSORS.items():
        settings = {k: v for k, v in base.items() if not k.startswith("_")}
        settings.pop("image_processor_type", None)
        settings.update(changes)
        processor = processor_class(**settings)
        processor.save_pretrained(out / "preprocessors" / pname)
        for name in images:
            pixel_values = processor(images=images[name], return_tensors="pt").pixel_values
            np.save(out / "ref" / f"{pname}_{name}_pixel_values.npy", pixel_values.numpy())
            preprocessors.append(
                {
                    "name": f"{pname}_{name}",
                    "config": f"preprocessors/{pname}/preprocessor_config.json",
                    "image": f"images/{name}.png",
                    "pixel_values": f"ref/{pname}_{name}_pixel_values.npy",
                }
            )

    rng = np.random.default_rng(7)
    resizes = []
    for fname, pil_filter in PIL_FILTERS.items():
        for in_w, in_h, out_w, out_h in RESIZES:
            pixels = rng.integers(0, 256, (in_h, in_w, 3), dtype=np.uint8)
            resized = np.array(Image.fromarray(pixels, "RGB").resize((out_w, out_h), pil_filter))
            resizes.append(
                {
                    "filter": fname,
                    "in_size": [in_w, in_h],
                    "out_size": [out_w, out_h],
                    "input": pixels.reshape(-1).tolist(),
                    "output": resized.reshape(-1).tolist(),
                }
            )

    interpolations = []
    for in_w, in_h, out_w, out_h in INTERPOLATIONS:
        plane = torch.from_numpy(rng.normal(0, 1, (1, 1, in_h, in_w)).astype(np.float32))
        result = torch.nn.functional.interpolate(
            plane, size=(out_h, out_w), mode="bicubic", align_corners=False
        )
        interpolations.append(
            {
                "in_size": [in_w, in_h],
                "out_size": [out_w, out_h],
                # float32 values printed exactly (repr of the widened double round-trips).
                "input": [float(v) for v in plane.reshape(-1)],
                "output": [float(v) for v in result.reshape(-1)],
            }
        )

    import PIL
    import transformers

    index = {
        "model": "model",
        "image_processor": processor_class.__name__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "cases": cases,
        "preprocessors": preprocessors,
        "resizes": resizes,
        "interpolations": interpolations,
    }
    (out / "cases.json").write_text(json.dumps(index, indent=1) + "\n")
    print(
        f"wrote {len(cases)} depth cases, {len(preprocessors)} preprocessing cases, "
        f"{len(resizes)} Pillow and {len(interpolations)} torch resizes to {out} "
        f"in {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
