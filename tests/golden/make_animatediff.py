"""Builds the AnimateDiff fixtures (issue #21): a tiny random-weight motion adapter for the parity
fixtures' SD1.5 pipeline, its `python -m export animatediff` exports (plain, and with a TCD LoRA
and a motion LoRA fused), the two LoRAs (the motion LoRA in diffusers' and in the original
AnimateDiff key layout), and diffusers' own AnimateDiffPipeline TCD outputs.

Run from the repository root with the pinned environment, after make_parity.py (this reuses its
sd15 pipeline):

    .venv/bin/python tests/golden/make_animatediff.py [OUT_DIR]

OUT_DIR defaults to tests/fixtures/generated/animatediff. Everything under it is rewritten.
Layout:

    OUT_DIR/diffusers/                  the base pipeline (a link to parity/sd15/diffusers)
    OUT_DIR/motion_adapter/             `python -m export tiny-motion-adapter --seed 0
                                        --max-frames 24`: a MotionAdapter (save_pretrained)
                                        sized for the base, every parameter random
    OUT_DIR/onnx/                       `python -m export animatediff OUT_DIR/diffusers
                                        OUT_DIR/motion_adapter OUT_DIR/onnx` (unfused; the
                                        manifest's "motion": {"max_frames": 24, "source"})
    OUT_DIR/onnx_fused/                 the same with `--lora tcd_lora.safetensors:1.0
                                        --lora motion_lora.safetensors:1.2 --fuse-lora`
    OUT_DIR/tcd_lora.safetensors        a random TCD-style LoRA: diffusers/peft format
                                        (`unet.<module>.lora_A.weight` / `lora_B.weight`, rank 4,
                                        alpha 2 in the header's metadata), UNet only, on the TCD
                                        LoRA's target modules of the (spatial) UNet
                                        (make_lora_slots.py's writer and modules)
    OUT_DIR/motion_lora.safetensors     a random motion LoRA as guoyww/animatediff-motion-lora-*
                                        ship it: `unet.<block>.motion_modules.<i>.
                                        transformer_blocks.<j>.attn{1,2}.processor.
                                        to_{q,k,v,out}_lora.{down,up}.weight`, rank 4, no alpha
                                        (diffusers applies it with scale 1), on every motion
                                        module
    OUT_DIR/motion_lora_original.safetensors  the same tensors under the original AnimateDiff
                                        names (`<block>.motion_modules.<i>.temporal_transformer.
                                        transformer_blocks.<j>.attention_blocks.{0,1}.processor.
                                        to_q_lora.down.weight`); motion_lora.safetensors is what
                                        diffusers' convert_animatediff_motion_lora_to_diffusers.py
                                        makes of it (checked here)
    OUT_DIR/cases.json                  the requests (fields below)
    OUT_DIR/reference/<name>.npy        diffusers' final latents, float32 [1, 4, frames, h, w]
                                        (what output_type="latent" returns)
    OUT_DIR/reference/<name>_frames.npy the frames diffusers' output_type="pil" gives, uint8
                                        [frames, H, W, 3], from the same call
    OUT_DIR/reference/<name>.npz        for cases with "intermediates": see
                                        export/reference_animatediff.py

Case fields: the text-to-image fixtures' (name, prompt, negative_prompt, steps, eta, guidance,
seed, width, height, "loras": [{"file", "weight"}] relative to OUT_DIR, "fuse": false), plus
"frames", "decode_chunk" (diffusers' decode_chunk_size), "model" ("onnx" or "onnx_fused": the
export the engine runs) and, for the fused model's case, "fused_loras": the LoRAs the model has
fused in (the engine applies nothing; the reference loads and fuses them, as the export did).
Every case runs TCDScheduler at 64x64 (the tiny VAE's latents are 32x32). The references come
from `python -m export reference --motion-adapter` (export/reference_animatediff.py): one
AnimateDiffPipeline call per case. Every number the Rust tests compare against comes from
diffusers through this script.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(ROOT))  # the export package
from goldenlib import export_cli  # noqa: E402
from make_img2img import link  # noqa: E402

GENERATED = ROOT / "tests/fixtures/generated"
PARITY = GENERATED / "parity/sd15"
PROMPT = "a corgi running on a beach at sunset"
NEGATIVE = "blurry, low quality"
ADAPTER_SEED = 0
MAX_FRAMES = 24
TCD = "tcd_lora.safetensors"
MOTION = "motion_lora.safetensors"
MOTION_ORIGINAL = "motion_lora_original.safetensors"
TCD_SEED = 7300
MOTION_SEED = 7301
MOTION_RANK = 4
MOTION_STD = 0.15
LORA_WEIGHTS = {TCD: 1.0, MOTION: 1.2, MOTION_ORIGINAL: 1.2}
PROJECTIONS = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora",
               "to_out.0": "to_out_lora"}


def log(msg):
    print(msg, flush=True)


# --- LoRAs --------------------------------------------------------------------------------


def original_name(module):
    """A diffusers motion attention's name in the original AnimateDiff layout (the inverse of
    diffusers' converter): `...motion_modules.0.transformer_blocks.0.attn1` ->
    `...motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0`."""
    head, _, tail = module.partition(".transformer_blocks.")
    block, attn = tail.split(".")
    index = {"attn1": "0", "attn2": "1"}[attn]
    return f"{head}.temporal_transformer.transformer_blocks.{block}.attention_blocks.{index}"


def write_motion_loras(unet, out):
    """The random motion LoRA in the original layout and, through diffusers' conversion, in
    diffusers' layout; returns the number of LoRA'd Linear layers."""
    import torch
    from safetensors.torch import save_file

    from export.lora import motion_lora_to_diffusers

    g = torch.Generator().manual_seed(MOTION_SEED)
    original, expected = {}, {}
    for name, module in unet.named_modules():
        if "motion_modules" not in name or not name.endswith((".attn1", ".attn2")):
            continue
        for proj, key in PROJECTIONS.items():
            linear = module.get_submodule(proj)
            down = torch.randn(MOTION_RANK, linear.in_features, generator=g) * MOTION_STD
            up = torch.randn(linear.out_features, MOTION_RANK, generator=g) * MOTION_STD
            for part, value in (("down", down), ("up", up)):
                original[f"{original_name(name)}.processor.{key}.{part}.weight"] = value
                expected[f"unet.{name}.processor.{key}.{part}.weight"] = value
    converted = motion_lora_to_diffusers(original)
    if converted.keys() != expected.keys():
        raise RuntimeError("diffusers' conversion of the original motion LoRA gave other names")
    save_file(original, str(out / MOTION_ORIGINAL))
    save_file(converted, str(out / MOTION))
    return len(original) // 2


def check_motion_lora(pipe, out, layers):
    """diffusers loads every layer of motion_lora.safetensors, and it moves the UNet's output."""
    import torch

    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 16, 16, generator=g)
    states = torch.randn(8, 77, pipe.unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(500.0)
    with torch.no_grad():
        before = pipe.unet(sample, t, states).sample
        pipe.load_lora_weights(str(out), weight_name=MOTION, adapter_name="motion")
        pipe.set_adapters(["motion"], adapter_weights=[LORA_WEIGHTS[MOTION]])
        loaded = sum(1 for n, _ in pipe.unet.named_parameters() if ".lora_A." in n)
        after = pipe.unet(sample, t, states).sample
        pipe.unload_lora_weights()
    if loaded != layers:
        raise RuntimeError(f"diffusers loaded {loaded} of the motion LoRA's {layers} layers")
    moved = float((after - before).abs().max() / before.abs().max())
    if moved < 1e-2:
        raise RuntimeError(f"the motion LoRA barely moves the UNet's output ({moved:.2e})")
    return moved


# --- cases --------------------------------------------------------------------------------


def case(name, frames, guidance, seed, loras=(), model="onnx", decode_chunk=16, **extra):
    c = {
        "name": name,
        "prompt": PROMPT,
        "steps": 5,
        "eta": 0.3,
        "guidance": guidance,
        "seed": seed,
        "width": 64,
        "height": 64,
        "frames": frames,
        "decode_chunk": decode_chunk,
        "loras": [{"file": f, "weight": LORA_WEIGHTS[f]} for f in loras],
        "fuse": False,
        "model": model,
    }
    c.update(extra)
    return c


def cases():
    both = (TCD, MOTION)
    return [
        case("f8_g0", 8, 0.0, 9104, intermediates=True),
        case("f16_g0", 16, 0.0, 9101),
        case("f8_g2_negative", 8, 2.0, 9102, negative_prompt=NEGATIVE, intermediates=True),
        case("f16_g2", 16, 2.0, 9103),
        # The same request as f8_g0 with the LoRAs (the engine: --lora tcd_lora.safetensors:1.0
        # --lora motion_lora.safetensors:1.2).
        case("f8_g0_loras", 8, 0.0, 9104, loras=both),
        case("f16_g2_loras", 16, 2.0, 9105, loras=both),
        # f8_g0_loras on the model with both LoRAs fused in, no runtime LoRAs.
        case("f8_g0_fused", 8, 0.0, 9104, model="onnx_fused",
             fused_loras=[{"file": f, "weight": LORA_WEIGHTS[f]} for f in both]),
        # A chunk size that does not divide the frames: chunks of 3, 3 and 2.
        case("f8_g0_chunk3", 8, 0.0, 9106, decode_chunk=3),
        # f8_g0_loras with the motion LoRA in the original AnimateDiff layout.
        case("f8_g0_loras_original", 8, 0.0, 9104, loras=(TCD, MOTION_ORIGINAL)),
        case("f8_g0_eta0", 8, 0.0, 9107, eta=0.0),
        # A frame count that is not a power of two.
        case("f5_g2", 5, 2.0, 9108),
    ]


# --- driver -------------------------------------------------------------------------------


def check_references(ref):
    """What the cases promise of each other: the original-layout motion LoRA gives the same
    result as diffusers' layout, the fused LoRAs nearly the same, and the LoRAs move it."""
    same = np.load(ref / "f8_g0_loras.npy")
    if not np.array_equal(np.load(ref / "f8_g0_loras_original.npy"), same):
        raise RuntimeError("the original-layout motion LoRA gave a different result")
    scale = float(np.abs(same).max())
    fused = float(np.abs(np.load(ref / "f8_g0_fused.npy") - same).max()) / scale
    moved = float(np.abs(np.load(ref / "f8_g0.npy") - same).max()) / scale
    if fused > 1e-3 or moved < 1e-2:
        raise RuntimeError(f"fused vs unfused {fused:.2e}, LoRAs vs none {moved:.2e}")
    return fused, moved


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else GENERATED / "animatediff"
    out = out.resolve()
    if not (PARITY / "diffusers/model_index.json").exists():
        sys.exit(f"{PARITY}: run tests/golden/make_parity.py first (this reuses its sd15 pipeline)")
    from export.cli import _quiet_libraries

    _quiet_libraries()  # before transformers and diffusers are imported
    import torch
    from diffusers import DiffusionPipeline

    from export.animatediff import load_animatediff

    import make_lora_slots

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    if out.exists():
        for child in out.iterdir():
            if child.is_symlink() or child.is_file():
                child.unlink()
            else:
                shutil.rmtree(child)
    out.mkdir(parents=True, exist_ok=True)
    base = out / "diffusers"
    link(base, PARITY / "diffusers")
    adapter = out / "motion_adapter"
    export_cli("tiny-motion-adapter", "--unet", base, adapter, "--seed", ADAPTER_SEED,
               "--max-frames", MAX_FRAMES)

    pipe = DiffusionPipeline.from_pretrained(base, dtype=torch.float32)
    tcd_modules = make_lora_slots.slot_modules(pipe.unet)
    make_lora_slots.write_tcd(pipe, tcd_modules, out / TCD, TCD_SEED)
    del pipe
    video = load_animatediff(str(base), str(adapter))
    layers = write_motion_loras(video.unet, out)
    moved = check_motion_lora(video, out, layers)
    del video
    log(f"LoRAs: TCD on {len(tcd_modules)} modules, motion on {layers} layers (moves the "
        f"UNet's output by {moved:.2f} of its largest value)")

    secs = export_cli("animatediff", base, adapter, out / "onnx")
    log(f"onnx: {secs:.0f}s")
    secs = export_cli("animatediff", base, adapter, out / "onnx_fused",
                      "--lora", f"{out / TCD}:{LORA_WEIGHTS[TCD]}",
                      "--lora", f"{out / MOTION}:{LORA_WEIGHTS[MOTION]}", "--fuse-lora")
    log(f"onnx_fused: {secs:.0f}s")

    case_file = out / "cases.json"
    case_file.write_text(json.dumps(cases(), indent=1) + "\n")
    ref = out / "reference"
    secs = export_cli("reference", "--model", base, "--motion-adapter", adapter,
                      "--cases", case_file, "--out-dir", ref)
    fused, moved = check_references(ref)
    log(f"references: {len(cases())} cases in {secs:.0f}s (fused vs unfused LoRAs "
        f"{fused:.1e}, LoRAs vs none {moved:.2f}, of the largest latent)")
    log(f"wrote {out} in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
