"""Builds the pipeline parity fixtures: tiny random-weight SD1.5-like, SD2.1-like (epsilon and
v-prediction) and SDXL-like diffusers pipelines, their ONNX exports, and diffusers' own TCD
outputs for a grid of requests.

SD1.5 and SDXL get the full grid. The SD2 families share SD1.5's conditioning code in the engine
and differ in the tokenizer's pad token and (sd21v) the prediction type, so a smaller grid keeps
fixture and test time down while still covering one and several steps, eta 0 and > 0, with and
without guidance, a non-square size and a negative prompt.

Run from the repository root with the pinned environment:

    .venv/bin/python tests/golden/make_parity.py [OUT_DIR [FAMILY ...]]

OUT_DIR defaults to tests/fixtures/generated/parity, FAMILY to all of sd15 sdxl sd21 sd21v.
Pipelines and exports already there are kept (an export whose UNet lacks the ControlNet residual
or IP-Adapter inputs is redone); the references are always rewritten. Layout:

    OUT_DIR/<family>/diffusers/   the random-weight pipeline (save_pretrained)
    OUT_DIR/<family>/onnx/        `python -m export convert` of it
    OUT_DIR/<family>/cases.json   the requests
    OUT_DIR/<family>/reference/   <name>.png (<name>_<i>.png for several) and <name>.npy

Every number the Rust parity tests compare against comes from diffusers through this script.
"""

import json
import sys
from pathlib import Path

from goldenlib import export_cli

ROOT = Path(__file__).resolve().parents[2]


FAMILIES = ("sd15", "sdxl", "sd21", "sd21v")
SD2_FAMILIES = ("sd21", "sd21v")


def sd2_cases(family):
    out = []
    for steps in (1, 4):
        for eta in (0.0, 0.3):
            for guidance in (0.0, 2.0):
                # One non-square size per family, alternating so each setting meets both.
                w, h = (64, 64) if (steps + (guidance > 0)) % 2 else (48, 80)
                out.append(
                    {
                        "name": f"s{steps}_e{eta}_g{guidance}_{w}x{h}",
                        "prompt": "a photo of an astronaut riding a horse on mars",
                        "steps": steps,
                        "eta": eta,
                        "guidance": guidance,
                        "seed": 1234 + steps,
                        "width": w,
                        "height": h,
                    }
                )
    out += [
        {
            # SD2's tokenizer treats "!" as its pad token (id 0) wherever it appears.
            "name": "negative_prompt",
            "prompt": "papercut of a winter mountain, snow!",
            "negative_prompt": "blurry, low quality",
            "steps": 8,
            "eta": 1.0,
            "guidance": 2.0,
            "seed": 7,
            "width": 64,
            "height": 64,
        },
        {
            "name": "two_images",
            "prompt": "a red cube",
            "steps": 4,
            "eta": 0.3,
            "guidance": 2.0,
            "seed": 11,
            "width": 64,
            "height": 64,
            "num_images": 2,
        },
    ]
    return out


def cases(family):
    if family in SD2_FAMILIES:
        return sd2_cases(family)
    out = []
    sizes = [(64, 64), (48, 80)] if family == "sd15" else [(64, 64), (80, 48)]
    for steps in (1, 4, 8):
        for eta in (0.0, 0.3, 1.0):
            for guidance in (0.0, 2.0):
                for (w, h) in sizes:
                    out.append(
                        {
                            "name": f"s{steps}_e{eta}_g{guidance}_{w}x{h}",
                            "prompt": "a photo of an astronaut riding a horse on mars",
                            "steps": steps,
                            "eta": eta,
                            "guidance": guidance,
                            "seed": 1234 + steps,
                            "width": w,
                            "height": h,
                        }
                    )
    out += [
        {
            "name": "negative_prompt",
            "prompt": "papercut of a winter mountain, snow",
            "negative_prompt": "blurry, low quality",
            "steps": 4,
            "eta": 0.3,
            "guidance": 2.0,
            "seed": 7,
            "width": 64,
            "height": 64,
        },
        {
            "name": "two_images",
            "prompt": "a red cube",
            "steps": 4,
            "eta": 0.3,
            "guidance": 2.0,
            "seed": 11,
            "width": 64,
            "height": 64,
            "num_images": 2,
        },
        {
            "name": "unicode_long_prompt",
            "prompt": "Painting of the orange cat Otto von Garfield, Count of "
            "Bismarck-Schönhausen, Duke of Lauenburg, Minister-President of Prussia. Depicted "
            "wearing a Prussian Pickelhaube and eating his favorite meal - lasagna. " * 2,
            "steps": 4,
            "eta": 0.3,
            "guidance": 0.0,
            "seed": 0,
            "width": 64,
            "height": 64,
        },
        {
            "name": "small_size",
            "prompt": "tiny",
            "steps": 2,
            "eta": 0.3,
            "guidance": 0.0,
            "seed": 3,
            "width": 16,
            "height": 24,
        },
    ]
    return out


def stale_export(onnx_dir):
    """An export from before the UNet took the ControlNet residual inputs or the IP-Adapter
    inputs, or from before the manifest recorded the attention (export/attention.py)."""
    unet = json.loads((onnx_dir / "tcd_ort.json").read_text())["components"]["unet"]
    inputs = unet["inputs"]
    return (
        "mid_block_additional_residual" not in inputs
        or "ip_key_0" not in inputs
        or "attention" not in unet
    )



def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/generated/parity"
    families = sys.argv[2:] or FAMILIES
    for family in families:
        base = out / family
        base.mkdir(parents=True, exist_ok=True)
        pipe = base / "diffusers"
        onnx_dir = base / "onnx"
        if not (pipe / "model_index.json").exists():
            export_cli("tiny", "--family", family, pipe)
        if not (onnx_dir / "tcd_ort.json").exists() or stale_export(onnx_dir):
            export_cli("convert", pipe, onnx_dir, "--overwrite")
        case_file = base / "cases.json"
        case_file.write_text(json.dumps(cases(family), indent=1))
        export_cli("reference", "--model", pipe, "--cases", case_file,
            "--out-dir", base / "reference")


if __name__ == "__main__":
    main()
