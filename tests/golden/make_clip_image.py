"""Builds the CLIP image fixtures: seeded random RGB images of odd sizes and aspect ratios, and
the `pixel_values` transformers' `CLIPImageProcessor` makes of them, the pre-processing of an
IP-Adapter's reference image.

Run from the repository root with the pinned environment:

    .venv/bin/python tests/golden/make_clip_image.py [OUT_DIR]

OUT_DIR defaults to tests/fixtures/generated/clip_image. Everything is rewritten. Layout:

    OUT_DIR/images/<image>.png                        the RGB inputs
    OUT_DIR/configs/<config>/preprocessor_config.json processor settings other than the defaults
    OUT_DIR/ref/<config>_<image>.npy                  pixel_values [1, 3, h, w], float32
    OUT_DIR/cases.json                                {"image_processor", "diffusers_class",
        "transformers", "pillow", "cases": [{"name", "config" (null: the class defaults),
        "image", "pixel_values"}], "resizes": [{"filter", "in_size", "out_size", "input",
        "output"}]}, paths relative to OUT_DIR

The resizes are Pillow's `Image.resize` of small random images to random sizes, both axes
changing: Pillow 13 runs the vertical pass first when the height shrinks by more than twice as
many pixels as the width, and on noise the two orders differ by tens of levels, so these pin the
order down.

diffusers' `load_ip_adapter` makes the processor itself, `CLIPImageProcessor(size=s,
crop_size=s)` with `s` the image encoder's `image_size`, and its pipelines call
`feature_extractor(image, return_tensors="pt").pixel_values`; this script makes the same call.
In transformers 5, `CLIPImageProcessor` names the torchvision backend when torchvision is
installed and falls back to `CLIPImageProcessorPil` (Pillow resize, NumPy arithmetic) when it is
not, as in the pinned environment (no torchvision): the Pillow one is the reference, taken by
its own name here so that installing torchvision cannot change the fixtures; `diffusers_class`
in cases.json records which class diffusers' call resolves to here.

The "default" references are `CLIPImageProcessor(size=224, crop_size=224)` (diffusers' call for
a 224-pixel encoder), checked equal to `CLIPImageProcessor()`'s. The other configurations are
written as JSON, in the key forms real `preprocessor_config.json` files use (legacy ints,
`shortest_edge`, `height`/`width`), and loaded with `from_pretrained`, so transformers itself
interprets them. Every number comes from transformers and Pillow through this script.
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

# (width, height): down and up on both axes, already 224, very wide and very tall, smaller than
# the crop, one axis at 224 (no resize on it), and a 1x3 sliver.
IMAGES = [(37, 53), (300, 200), (224, 224), (500, 97), (97, 500), (17, 17), (225, 1000), (224, 300)]
IMAGES += [(1, 3)]

# Random two-axis resizes per filter, to pin down Pillow's pass order.
RESIZES_PER_FILTER = 40
PIL_FILTERS = {"lanczos": 1, "bilinear": 2, "bicubic": 3}

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Configurations written as preprocessor_config.json: name -> JSON object.
CONFIGS = {
    # What diffusers makes for a tiny encoder (image_size 32), as save_pretrained writes it.
    "tiny32": None,
    # The old feature-extractor form (Stable Diffusion's safety checker, openai/clip-vit-*):
    # ints for size (shortest edge) and crop_size (a square), LANCZOS.
    "legacy_int": {
        "feature_extractor_type": "CLIPFeatureExtractor",
        "crop_size": 40,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "resample": 1,
        "size": 48,
    },
    # No resize: the crop alone, padded with zeros where the image is smaller.
    "no_resize": {"do_resize": False},
    # A crop taller than the resized image and narrower: padded on one axis, cropped on the other.
    "pad_and_crop": {
        "size": {"shortest_edge": 24},
        "crop_size": {"height": 40, "width": 20},
    },
    # A fixed (height, width) resize with BILINEAR, no crop: a non-square output.
    "exact_bilinear": {
        "size": {"height": 50, "width": 70},
        "resample": 2,
        "do_center_crop": False,
    },
    # A bare size read as a square (`default_to_square`), and [height, width] lists.
    "square_int": {"size": 30, "default_to_square": True, "crop_size": 24},
    "lists": {"size": [20, 30], "crop_size": [10, 12]},
    # Shortest edge without the crop: the aspect ratio survives.
    "no_crop": {"size": {"shortest_edge": 20}, "do_center_crop": False},
    # Normalised without the rescale, and rescaled without the normalisation (scalar mean/std).
    "no_rescale": {"size": 16, "crop_size": {"height": 16, "width": 16}, "do_rescale": False},
    "no_normalize": {
        "size": 16,
        "crop_size": 16,
        "do_normalize": False,
        "image_mean": 0.5,
        "image_std": 0.5,
    },
    # Neither: transformers returns the uint8 pixels (saved as float32 here).
    "raw": {"size": 16, "crop_size": 16, "do_rescale": False, "do_normalize": False},
}


def processor_classes():
    """The Pillow processor, and the class diffusers' `CLIPImageProcessor` resolves to here."""
    import transformers

    try:
        from transformers import CLIPImageProcessorPil as pil_class
    except ImportError:  # transformers 4: CLIPImageProcessor is the Pillow one
        from transformers import CLIPImageProcessor as pil_class
    return pil_class, transformers.CLIPImageProcessor


def pixel_values(processor, image):
    """diffusers' `encode_image` call, as float32 NumPy (the uint8 pixels when neither
    rescaled nor normalised)."""
    values = processor(image, return_tensors="pt").pixel_values
    return values.numpy().astype(np.float32)


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/generated/clip_image"
    for sub in ("images", "configs", "ref"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    pil_class, diffusers_class = processor_classes()

    rng = np.random.default_rng(20)
    images = {}
    for width, height in IMAGES:
        name = f"{width}x{height}"
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(out / "images" / f"{name}.png")
        # Read back, so the references come from the exact bytes the Rust test loads.
        images[name] = Image.open(out / "images" / f"{name}.png").convert("RGB")

    processors = {"default": (None, pil_class(size=224, crop_size=224))}
    plain = pil_class()
    for cname, settings in CONFIGS.items():
        cdir = out / "configs" / cname
        cdir.mkdir(parents=True, exist_ok=True)
        if settings is None:
            pil_class(size=32, crop_size=32).save_pretrained(cdir)
        else:
            (cdir / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n")
        config = f"configs/{cname}/preprocessor_config.json"
        processors[cname] = (config, pil_class.from_pretrained(cdir))

    cases = []
    for cname, (config, processor) in processors.items():
        for iname, image in images.items():
            values = pixel_values(processor, image)
            if cname == "default" and not np.array_equal(values, pixel_values(plain, image)):
                raise SystemExit(f"{iname}: CLIPImageProcessor() and (size=224) differ")
            ref = f"ref/{cname}_{iname}.npy"
            np.save(out / ref, values)
            cases.append(
                {
                    "name": f"{cname}_{iname}",
                    "config": config,
                    "image": f"images/{iname}.png",
                    "pixel_values": ref,
                }
            )

    resizes = []
    for fname, pil_filter in PIL_FILTERS.items():
        for _ in range(RESIZES_PER_FILTER):
            in_w, in_h, out_w, out_h = (int(v) for v in rng.integers(1, 40, 4))
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

    import PIL
    import transformers

    index = {
        "image_processor": pil_class.__name__,
        "diffusers_class": diffusers_class.__name__,
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "cases": cases,
        "resizes": resizes,
    }
    (out / "cases.json").write_text(json.dumps(index, indent=1) + "\n")
    print(
        f"wrote {len(cases)} CLIP image cases ({len(images)} images, {len(processors)} "
        f"configurations; diffusers' CLIPImageProcessor is {diffusers_class.__name__} here) "
        f"and {len(resizes)} Pillow resizes to {out}"
    )


if __name__ == "__main__":
    main()
