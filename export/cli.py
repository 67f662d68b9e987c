"""Command line: `python -m export COMMAND ...`, COMMAND one of `convert`, `animatediff`,
`controlnet`, `depth`, `ip-adapter`, `vae-tiny`, `tiny`, `tiny-controlnet`, `tiny-depth`,
`tiny-ip-adapter`, `tiny-motion-adapter`, `tiny-vae-tiny`, `full`, `reference` and `segment`.

`convert` is the default: `python -m export SOURCE OUT_DIR` means `python -m export convert
SOURCE OUT_DIR`.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import time
import warnings

from export.errors import UserError

COMMANDS = (
    "convert",
    "animatediff",
    "controlnet",
    "depth",
    "ip-adapter",
    "vae-tiny",
    "tiny",
    "tiny-controlnet",
    "tiny-depth",
    "tiny-ip-adapter",
    "tiny-motion-adapter",
    "tiny-vae-tiny",
    "full",
    "reference",
    "segment",
)


def _add_attention(parser: argparse.ArgumentParser) -> None:
    """`--attention` of the commands that export diffusers attention (export/attention.py)."""
    parser.add_argument(
        "--attention",
        choices=("fused", "plain"),
        default="fused",
        help="fused (default): attention as ONNX Runtime's MultiHeadAttention, which runs "
        "without materialising the attention maps on CPU, CUDA and DirectML; plain: standard "
        "ONNX ops only, for TensorRT and CoreML (which cannot run com.microsoft ops)",
    )


def _add_lora(parser: argparse.ArgumentParser) -> None:
    """The LoRA options of the commands that export a pipeline (`convert`, `animatediff`)."""
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="ID_OR_PATH[:WEIGHT]",
        help="a LoRA (.safetensors file, dir or hub id) with an optional adapter weight "
        "(default 1.0); repeatable. Recorded in the manifest for the engine to apply at load "
        "time, or baked in with --fuse-lora",
    )
    parser.add_argument(
        "--lora-weight-name",
        metavar="NAME",
        help="the .safetensors file to use inside --lora dirs and hub repos",
    )
    parser.add_argument(
        "--fuse-lora",
        action="store_true",
        help="fuse the LoRAs into the exported weights (diffusers' set_adapters + fuse_lora)",
    )
    parser.add_argument(
        "--lora-slots",
        type=int,
        metavar="RANK",
        help="export the UNet with empty LoRA layers of this rank on the TCD LoRA target "
        "modules, so the engine applies LoRAs unfused (peft's W x + B A x) instead of fusing "
        "them at load time; LoRAs whose ranks add up to more than RANK are fused",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export Stable Diffusion pipelines to the ONNX model directory tcd-ort reads, "
        "build random-weight test pipelines, and run the diffusers reference.",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser(
        "convert",
        help="export a diffusers pipeline (dir, .safetensors or hub id) to ONNX (default command)",
    )
    c.add_argument("source", help="diffusers pipeline dir, single-file .safetensors, or hub id")
    c.add_argument("out_dir", type=pathlib.Path, help="model directory to write")
    c.add_argument(
        "--config",
        help="diffusers config dir (model_index.json + component configs) for a single-file "
        "checkpoint, so nothing is fetched from the hub",
    )
    c.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    _add_lora(c)
    c.add_argument(
        "--dtype",
        choices=("fp32", "fp16"),
        default="fp32",
        help="dtype of the text encoder(s) and the UNet, weights and inputs/outputs (default "
        "fp32); the VAE stays fp32 (see --vae-dtype)",
    )
    c.add_argument(
        "--vae-dtype",
        choices=("fp32", "fp16"),
        default="fp32",
        help="dtype of the VAE (default fp32): fp16 only for VAEs made for it, such as "
        "madebyollin/sdxl-vae-fp16-fix; others decode NaNs (black images) in fp16",
    )
    _add_attention(c)

    ad = sub.add_parser(
        "animatediff",
        help="export an SD1.x/SD2.x pipeline with an AnimateDiff motion adapter: the convert "
        "layout whose unet/ is the motion UNet (video latents [batch, 4, frames, h, w])",
    )
    ad.add_argument("base", help="diffusers pipeline dir, single-file .safetensors, or hub id")
    ad.add_argument(
        "motion_adapter", help="diffusers MotionAdapter dir (save_pretrained) or hub id"
    )
    ad.add_argument("out_dir", type=pathlib.Path, help="model directory to write")
    ad.add_argument(
        "--config",
        help="diffusers config dir for a single-file BASE, so nothing is fetched from the hub",
    )
    ad.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    ad.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    _add_lora(ad)
    _add_attention(ad)

    tm = sub.add_parser(
        "tiny-motion-adapter",
        help="write a random-weight AnimateDiff MotionAdapter for a tiny pipeline "
        "(save_pretrained layout)",
    )
    tm.add_argument(
        "--unet",
        type=pathlib.Path,
        required=True,
        metavar="PIPELINE_DIR",
        help="a pipeline written by `python -m export tiny` (its unet/ config)",
    )
    tm.add_argument("out_dir", type=pathlib.Path)
    tm.add_argument("--seed", type=int, default=0)
    tm.add_argument(
        "--max-frames",
        type=int,
        default=32,
        help="motion_max_seq_length: the most frames the adapter takes (default 32)",
    )
    tm.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")

    cn = sub.add_parser(
        "controlnet",
        help="export a diffusers ControlNetModel (dir or hub id) to a flat ONNX directory",
    )
    cn.add_argument("source", help="diffusers ControlNetModel dir or hub id")
    cn.add_argument("out_dir", type=pathlib.Path, help="directory to write")
    cn.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    cn.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    cn.add_argument(
        "--dtype",
        choices=("fp32", "fp16"),
        default="fp32",
        help="dtype of the weights and the float inputs/outputs (default fp32); match the "
        "UNet's (`convert --dtype`)",
    )
    _add_attention(cn)

    vt = sub.add_parser(
        "vae-tiny",
        help="export a diffusers AutoencoderTiny (TAESD: dir or hub id, e.g. madebyollin/taesd, "
        "madebyollin/taesdxl) to vae_decoder/ and vae_encoder/ for the engine's tiny VAE",
    )
    vt.add_argument("source", help="diffusers AutoencoderTiny dir or hub id")
    vt.add_argument("out_dir", type=pathlib.Path, help="directory to write")
    vt.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    vt.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    vt.add_argument(
        "--dtype",
        choices=("fp32", "fp16"),
        default="fp32",
        help="dtype of the weights and the inputs/outputs (default fp32)",
    )

    tv = sub.add_parser(
        "tiny-vae-tiny",
        help="write a random-weight AutoencoderTiny for a tiny pipeline (same latent channels "
        "and scale factor as its VAE; save_pretrained layout)",
    )
    tv.add_argument(
        "--vae",
        type=pathlib.Path,
        required=True,
        metavar="PIPELINE_DIR",
        help="a pipeline written by `python -m export tiny` (its vae/ config)",
    )
    tv.add_argument("out_dir", type=pathlib.Path)
    tv.add_argument("--seed", type=int, default=0)
    tv.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")

    tc = sub.add_parser(
        "tiny-controlnet",
        help="write a random-weight ControlNetModel for a tiny pipeline (from_unet of its UNet)",
    )
    tc.add_argument(
        "--unet",
        type=pathlib.Path,
        required=True,
        metavar="PIPELINE_DIR",
        help="a pipeline written by `python -m export tiny` (its unet/ and vae/ configs)",
    )
    tc.add_argument("out_dir", type=pathlib.Path)
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")

    # Mirrors export.tiny.FAMILIES / FULL_FAMILIES without importing torch to parse arguments.
    for name, what, families in (
        (
            "tiny",
            "tiny random-weight pipeline (tests, demo)",
            ("sd15", "sd21", "sd21v", "sdxl", "sd15-inpaint", "sdxl-inpaint"),
        ),
        (
            "full",
            "full-size random-weight pipeline from export/configs (benchmarks)",
            ("sd15", "sdxl"),
        ),
    ):
        t = sub.add_parser(name, help=f"write a {what} in diffusers save_pretrained layout")
        t.add_argument("--family", choices=families, required=True)
        t.add_argument("out_dir", type=pathlib.Path)
        t.add_argument("--seed", type=int, default=0)
        t.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")

    d = sub.add_parser(
        "depth",
        help="export a transformers DPTForDepthEstimation (dir or hub id, e.g. "
        "Intel/dpt-hybrid-midas) for ControlNet-depth preprocessing",
    )
    d.add_argument("source", help="DPTForDepthEstimation dir (save_pretrained) or hub id")
    d.add_argument("out_dir", type=pathlib.Path, help="depth estimator directory to write")
    d.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    d.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")

    td = sub.add_parser(
        "tiny-depth",
        help="write a tiny random-weight hybrid DPT (dpt-hybrid-midas-like) in save_pretrained "
        "layout (tests)",
    )
    td.add_argument("out_dir", type=pathlib.Path)
    td.add_argument("--seed", type=int, default=0)
    td.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")

    ip = sub.add_parser(
        "ip-adapter",
        help="export an IP-Adapter (dir laid out like h94/IP-Adapter, or hub id): its CLIP image "
        "encoder and its image projection with every layer's to_k_ip / to_v_ip",
    )
    ip.add_argument(
        "source",
        help="hub id or directory holding SUBFOLDER/WEIGHT_NAME and SUBFOLDER/image_encoder/",
    )
    ip.add_argument("out_dir", type=pathlib.Path, help="IP-Adapter directory to write")
    ip.add_argument(
        "--subfolder",
        default="models",
        help="folder of the weights and the image encoder inside SOURCE (default models; "
        "sdxl_models for h94's SDXL adapters)",
    )
    ip.add_argument(
        "--weight-name",
        default="ip-adapter_sd15.safetensors",
        metavar="NAME",
        help="weights file in SUBFOLDER, .safetensors or .bin (default "
        "ip-adapter_sd15.safetensors)",
    )
    ip.add_argument(
        "--image-encoder-folder",
        default="image_encoder",
        metavar="FOLDER",
        help="the CLIP image encoder: a folder name inside SUBFOLDER (default image_encoder), "
        "or a path with a / relative to SOURCE (models/image_encoder for h94's *_vit-h SDXL "
        "adapters), as diffusers' load_ip_adapter(image_encoder_folder=...)",
    )
    ip.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    ip.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    _add_attention(ip)

    tip = sub.add_parser(
        "tiny-ip-adapter",
        help="write a random-weight IP-Adapter for a tiny pipeline, laid out like h94/IP-Adapter "
        "(models/ip-adapter[-plus].safetensors, models/image_encoder/)",
    )
    tip.add_argument(
        "--unet",
        type=pathlib.Path,
        required=True,
        metavar="PIPELINE_DIR",
        help="a pipeline written by `python -m export tiny` (its unet/ config)",
    )
    tip.add_argument(
        "--variant",
        choices=("plain", "plus"),
        default="plain",
        help="plain (default): ImageProjection of the image embeddings, 4 tokens; plus: the "
        "Resampler of the penultimate hidden states, 16 tokens",
    )
    tip.add_argument("out_dir", type=pathlib.Path)
    tip.add_argument("--seed", type=int, default=0)
    tip.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")

    sg = sub.add_parser(
        "segment",
        help="(re)write the UNet of a model directory as consecutive segments for the engine's "
        "low-memory mode (`convert` writes 2); graphs only, sharing the UNet's weights file",
    )
    sg.add_argument("model_dir", type=pathlib.Path, help="model directory written by `convert`")
    sg.add_argument(
        "--parts",
        type=int,
        default=2,
        help="how many segments (default 2); 1 removes them, so low-memory mode loads the UNet "
        "whole",
    )

    r = sub.add_parser("reference", help="run the diffusers TCD pipeline (golden outputs)")
    r.add_argument("--model", required=True, help="diffusers pipeline dir (or hub id)")
    r.add_argument(
        "--motion-adapter",
        metavar="DIR_OR_ID",
        help="run diffusers' AnimateDiffPipeline with this MotionAdapter on --model (batch mode "
        "only; cases add \"frames\" and \"decode_chunk\", see export/reference_animatediff.py)",
    )
    r.add_argument("--cases", type=pathlib.Path, help="JSON list of cases (batch mode)")
    r.add_argument(
        "--vae-tiny",
        metavar="DIR_OR_ID",
        help="replace the pipeline's VAE with this diffusers AutoencoderTiny (TAESD)",
    )
    r.add_argument("--prompt")
    r.add_argument("--negative-prompt", default=None)
    r.add_argument("--steps", type=int, default=4)
    r.add_argument("--eta", type=float, default=0.3)
    r.add_argument("--guidance", type=float, default=0.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="load a LoRA as its own adapter (repeatable; set_adapters with the weights); in "
        "batch mode it applies to cases that set no \"loras\"",
    )
    r.add_argument("--fuse-lora", action="store_true", help="fuse the --lora adapters first")
    r.add_argument("--width", type=int)
    r.add_argument("--height", type=int)
    r.add_argument(
        "--image",
        type=pathlib.Path,
        help="init image: image-to-image, or inpainting with --mask (batch: a case's \"image\")",
    )
    r.add_argument(
        "--mask", type=pathlib.Path, help="inpainting mask, white = repaint (needs --image)"
    )
    r.add_argument(
        "--strength",
        type=float,
        help="how much of the image to repaint, (0, 1]; default: the diffusers pipeline's "
        "(img2img 0.8, SDXL img2img 0.3, inpaint 1.0, SDXL inpaint 0.9999)",
    )
    r.add_argument(
        "--image-dir",
        type=pathlib.Path,
        help="directory relative image/mask paths are read from (default: the cases file's "
        "directory in batch mode, else the working directory)",
    )
    r.add_argument("--num-images", type=int, default=1)
    r.add_argument("--out-image", type=pathlib.Path, help="PNG of the first image")
    r.add_argument("--out-latents", type=pathlib.Path, help=".npy of the final latents")
    r.add_argument("--out-dir", type=pathlib.Path, help="image_0.png ...; batch mode output")
    r.add_argument(
        "--out-intermediates",
        type=pathlib.Path,
        help=".npz with prompt embeds (SDXL: pooled, add_time_ids) and latents after each step",
    )
    return p


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    except ImportError:
        pass
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _check_out_dir(parser: argparse.ArgumentParser, out_dir: pathlib.Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        parser.error(f"{out_dir} exists and is not empty; pass --overwrite to replace it")


def _lora_specs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    """The `--lora` arguments as export.lora.LoraSpec, after the option checks."""
    from export.lora import parse_lora_spec

    if args.fuse_lora and not args.lora:
        parser.error("--fuse-lora needs at least one --lora")
    if args.lora_weight_name is not None and not args.lora:
        parser.error("--lora-weight-name needs --lora")
    return [parse_lora_spec(s, args.lora_weight_name) for s in args.lora]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `python -m export SOURCE OUT_DIR` is `convert`.
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in COMMANDS:
        argv.insert(argv.index(first), "convert")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("export").setLevel(logging.ERROR if args.quiet else logging.INFO)
    _quiet_libraries()

    # Each command imports its module when it runs: they pull in torch, diffusers and onnx,
    # which `--help` and argument errors should not wait for.
    try:
        if args.command == "convert":
            from export.convert import convert

            loras = _lora_specs(parser, args)
            convert(
                args.source,
                args.out_dir,
                args.config,
                args.opset,
                args.overwrite,
                loras=loras,
                fuse_lora=args.fuse_lora,
                lora_slots=args.lora_slots,
                dtype=args.dtype,
                vae_dtype=args.vae_dtype,
                attention=args.attention,
            )
        elif args.command == "animatediff":
            from export.animatediff import animatediff

            loras = _lora_specs(parser, args)
            animatediff(
                args.base,
                args.motion_adapter,
                args.out_dir,
                args.config,
                args.opset,
                args.overwrite,
                loras=loras,
                fuse_lora=args.fuse_lora,
                lora_slots=args.lora_slots,
                attention=args.attention,
            )
        elif args.command == "tiny-motion-adapter":
            import shutil

            from export.tiny_motion_adapter import build_tiny_motion_adapter

            _check_out_dir(parser, args.out_dir, args.overwrite)
            if args.out_dir.exists():
                shutil.rmtree(args.out_dir)
            build_tiny_motion_adapter(args.unet, args.out_dir, args.seed, args.max_frames)
            logging.getLogger("export").info(
                "wrote tiny motion adapter for %s to %s", args.unet, args.out_dir
            )
        elif args.command == "controlnet":
            from export.controlnet import export_controlnet

            export_controlnet(
                args.source,
                args.out_dir,
                args.opset,
                args.overwrite,
                dtype=args.dtype,
                attention=args.attention,
            )
        elif args.command == "vae-tiny":
            from export.vae_tiny import export_vae_tiny

            export_vae_tiny(args.source, args.out_dir, args.opset, args.overwrite, args.dtype)
        elif args.command == "tiny-vae-tiny":
            import shutil

            from export.vae_tiny import build_tiny_vae_tiny

            _check_out_dir(parser, args.out_dir, args.overwrite)
            if args.out_dir.exists():
                shutil.rmtree(args.out_dir)
            build_tiny_vae_tiny(args.vae, args.out_dir, args.seed)
            logging.getLogger("export").info(
                "wrote tiny AutoencoderTiny for %s to %s", args.vae, args.out_dir
            )
        elif args.command == "tiny-controlnet":
            import shutil

            from export.controlnet import build_tiny_controlnet

            _check_out_dir(parser, args.out_dir, args.overwrite)
            if args.out_dir.exists():
                shutil.rmtree(args.out_dir)
            t = time.perf_counter()
            build_tiny_controlnet(args.unet, args.out_dir, args.seed)
            logging.getLogger("export").info(
                "wrote tiny ControlNet for %s to %s in %.1fs",
                args.unet,
                args.out_dir,
                time.perf_counter() - t,
            )
        elif args.command in ("tiny", "full"):
            import shutil

            from export import tiny

            _check_out_dir(parser, args.out_dir, args.overwrite)
            if args.out_dir.exists():
                shutil.rmtree(args.out_dir)
            t = time.perf_counter()
            build = tiny.build_tiny if args.command == "tiny" else tiny.build_full
            build(args.family, args.out_dir, args.seed)
            logging.getLogger("export").info(
                "wrote %s %s pipeline to %s in %.1fs",
                args.command,
                args.family,
                args.out_dir,
                time.perf_counter() - t,
            )
        elif args.command == "depth":
            from export.depth import convert_depth

            convert_depth(args.source, args.out_dir, args.opset, args.overwrite)
        elif args.command == "tiny-depth":
            import shutil

            from export.depth import build_tiny_depth

            _check_out_dir(parser, args.out_dir, args.overwrite)
            if args.out_dir.exists():
                shutil.rmtree(args.out_dir)
            build_tiny_depth(args.out_dir, args.seed)
            logging.getLogger("export").info("wrote tiny depth estimator to %s", args.out_dir)
        elif args.command == "ip-adapter":
            from export.ip_adapter import export_ip_adapter

            export_ip_adapter(
                args.source,
                args.out_dir,
                subfolder=args.subfolder,
                weight_name=args.weight_name,
                opset=args.opset,
                overwrite=args.overwrite,
                attention=args.attention,
                image_encoder_folder=args.image_encoder_folder,
            )
        elif args.command == "tiny-ip-adapter":
            import shutil

            from export.tiny_ip_adapter import (
                TINY_SUBFOLDER,
                TINY_WEIGHT_NAMES,
                build_tiny_ip_adapter,
            )

            _check_out_dir(parser, args.out_dir, args.overwrite)
            if args.out_dir.exists():
                shutil.rmtree(args.out_dir)
            build_tiny_ip_adapter(args.unet, args.out_dir, args.variant, args.seed)
            logging.getLogger("export").info(
                "wrote tiny %s IP-Adapter for %s to %s (export it with: python -m export "
                "ip-adapter %s OUT_DIR --subfolder %s --weight-name %s)",
                args.variant,
                args.unet,
                args.out_dir,
                args.out_dir,
                TINY_SUBFOLDER,
                TINY_WEIGHT_NAMES[args.variant],
            )
        elif args.command == "segment":
            from export.segments import segment_model_dir

            if args.parts < 1:
                parser.error("--parts must be at least 1")
            segment_model_dir(args.model_dir, args.parts)
        elif args.command == "reference" and args.motion_adapter is not None:
            if args.vae_tiny is not None:
                parser.error("--vae-tiny does not apply to --motion-adapter runs")
            from export import reference_animatediff

            reference_animatediff.run_from_args(args, parser)
        elif args.command == "reference":
            from export.reference import run_from_args

            run_from_args(args, parser)
    except UserError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return 0
