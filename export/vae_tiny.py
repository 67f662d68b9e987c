"""`python -m export vae-tiny`: a diffusers `AutoencoderTiny` (TAESD: madebyollin/taesd for
SD1.x/SD2.x, madebyollin/taesdxl for SDXL) -> a directory the engine uses in place of a model's
full VAE.

Layout written::

    OUT_DIR/vae_decoder/model.onnx  model.onnx_data  config.json
    OUT_DIR/vae_encoder/model.onnx  model.onnx_data  config.json
    OUT_DIR/tcd_ort.json

`config.json` (both folders) is the AutoencoderTiny config as diffusers saves it
(`_class_name: AutoencoderTiny`, `scaling_factor`, `latent_channels`,
`encoder_block_out_channels`, `decoder_block_out_channels`, `upsampling_scaling_factor`, and the
`block_out_channels` diffusers registers as a copy of the decoder's for the pipelines'
`vae_scale_factor`).

* `vae_decoder`: input `latent_sample` [batch, latent_channels, height, width], the latents
  already divided by `scaling_factor` (as the pipelines do; TAESD's is 1.0); output `sample`
  [batch, 3, image_height, image_width] = `AutoencoderTiny.decode(latent_sample).sample`,
  in [-1, 1] nominally but unclamped (the engine clamps and denormalises as for the full VAE).
  The decoder itself starts with a soft clamp of the latents, `tanh(x / 3) * 3`, and ends with
  `x * 2 - 1`: both are inside the graph.
* `vae_encoder`: input `sample` [batch, 3, height, width] in [-1, 1] (the graph maps it to
  [0, 1] itself, as `EncoderTiny` does); output `latents` [batch, latent_channels,
  latent_height, latent_width] = `AutoencoderTiny.encode(sample).latents`, NOT multiplied by
  `scaling_factor`. There is no distribution: diffusers' `retrieve_latents` returns `.latents`
  as they are, so the engine must not draw noise from the generator for it (the full VAE's
  sample does), and the seeded noise is the generator's first draw in image-to-image and
  inpainting.

`tcd_ort.json`: `{"format_version": 1, "kind": "vae-tiny", "dtype", "weights_keep_names": true,
"latent_channels", "scaling_factor", "scale_factor" (pixels per latent, measured on a decode:
2 ** (len(decoder_block_out_channels) - 1) for upsampling_scaling_factor 2), "exporter",
"components": {"vae_decoder": {...}, "vae_encoder": {...}}}`, the components described as in
the main manifest.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import time
from typing import Any

import onnx
import torch

from export.convert import DTYPE_NAMES, torch_dtype
from export.errors import UserError
from export.layout import ONNX_FILE
from export.manifest import FORMAT_VERSION, describe_component, exporter_info, write_manifest
from export.onnx_io import Io, export_component, module_dtype
from export.sources import load_model
from export.vae import export_vae_decoder, prepare_for_export

log = logging.getLogger("export")

TINY_VAE_CLASS = "AutoencoderTiny"
KIND = "vae-tiny"
DECODER, ENCODER = "vae_decoder", "vae_encoder"


class _Encoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample, return_dict=False)[0]


def config_scale_factor(config: Any) -> int:
    """Pixels per latent as diffusers' pipelines compute it (`vae_scale_factor`)."""
    return 2 ** (len(config.decoder_block_out_channels) - 1)


def load_vae_tiny(source: str) -> Any:
    """An `AutoencoderTiny` from a local directory (its own, or a pipeline's with a `vae/`
    folder holding one) or a hub id, in float32 on CPU."""
    from diffusers import AutoencoderTiny

    return load_model(source, AutoencoderTiny, "vae", "madebyollin/taesd")


def measured_scale_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent, from a decode and an encode of small tensors; fails when the two
    disagree with each other or with the pipelines' `vae_scale_factor`."""
    dtype = module_dtype(vae)
    h, w = 3, 5
    with torch.no_grad():
        image = vae.decode(torch.zeros(1, vae.config.latent_channels, h, w, dtype=dtype)).sample
        f = image.shape[2] // h
        if tuple(image.shape[2:]) != (h * f, w * f):
            raise UserError(f"decoding {h}x{w} latents gave a {tuple(image.shape[2:])} image")
        latents = vae.encode(torch.zeros(1, 3, h * f, w * f, dtype=dtype)).latents
    if tuple(latents.shape[2:]) != (h, w):
        raise UserError(
            f"the encoder does not invert the decoder's x{f} scale "
            f"({h * f}x{w * f} pixels -> {tuple(latents.shape[2:])} latents)"
        )
    if f != config_scale_factor(vae.config):
        raise UserError(
            f"this AutoencoderTiny scales by {f}, but diffusers' pipelines assume "
            f"{config_scale_factor(vae.config)} (2 ** (len(decoder_block_out_channels) - 1))"
        )
    return f


def export_vae_tiny_encoder(
    vae: torch.nn.Module, out_dir: pathlib.Path, opset: int, scale: int
) -> onnx.ModelProto:
    prepare_for_export(vae)
    image = (torch.rand(2, vae.config.in_channels, 24 * scale, 40 * scale) * 2 - 1).to(
        module_dtype(vae)
    )
    model = export_component(
        _Encoder(vae),
        (image,),
        [Io("sample", {0: "batch", 2: "height", 3: "width"})],
        [Io("latents", {0: "batch", 2: "latent_height", 3: "latent_width"})],
        out_dir,
        opset,
        prefix="vae.",
    )
    vae.save_config(out_dir)
    return model


def build_vae_tiny_manifest(
    out_dir: pathlib.Path, config: Any, scale: int, opset: int, dtype: str = "float32"
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "dtype": dtype,
        "weights_keep_names": True,
        "latent_channels": int(config.latent_channels),
        "scaling_factor": float(config.scaling_factor),
        "scale_factor": int(scale),
        "exporter": exporter_info(opset),
        "components": {
            name: describe_component(out_dir / name / ONNX_FILE) for name in (DECODER, ENCODER)
        },
    }


def export_vae_tiny(
    source: str,
    out_dir: pathlib.Path,
    opset: int = 18,
    overwrite: bool = False,
    dtype: str = "fp32",
) -> dict[str, Any]:
    """Export the AutoencoderTiny `source` into `out_dir`; returns the manifest.

    `dtype="fp16"` exports float16 weights and float16 inputs/outputs (TAESD runs in float16,
    unlike most full SD VAEs)."""
    model_dtype = torch_dtype(dtype)
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    t0 = time.perf_counter()
    vae = load_vae_tiny(source).eval()
    scale = measured_scale_factor(vae)
    vae = vae.to(model_dtype)
    log.info("loaded %s (AutoencoderTiny, x%d) in %.1fs", source, scale, time.perf_counter() - t0)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    # The full VAE's decoder export: the same input, output and module call (TAESD has no
    # attention for the translation to touch).
    export_vae_decoder(vae, out_dir / DECODER, opset, attention="plain")
    export_vae_tiny_encoder(vae, out_dir / ENCODER, opset, scale)
    manifest = build_vae_tiny_manifest(out_dir, vae.config, scale, opset, DTYPE_NAMES[dtype])
    write_manifest(out_dir, manifest)
    log.info("wrote %s in %.1fs", out_dir, time.perf_counter() - t0)
    return manifest


def build_tiny_vae_tiny(
    pipeline_dir: pathlib.Path, out_dir: pathlib.Path, seed: int = 0
) -> pathlib.Path:
    """A random-weight AutoencoderTiny that fits a tiny pipeline's VAE (same latent channels,
    same scale factor: one block per factor 2, all 16 channels wide), saved with
    `save_pretrained`. Its `scaling_factor` is 1.0, TAESD's.

    Weights: seeded He-normal convolutions with small random biases, then each half's last
    convolution rescaled (on seeded random inputs) so that decoded images spread over about
    [-1, 1] (mean 0, std 0.5) and encoded latents have about unit variance, like a trained
    TAESD's; PyTorch's default initialisation would decode nearly black images and encode
    latents near zero. Different seeds give different models."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    pipeline_dir = pathlib.Path(pipeline_dir)
    if not (pipeline_dir / "vae" / "config.json").exists():
        raise UserError(f"{pipeline_dir}: not a diffusers pipeline directory with a vae/")
    vae_cfg = AutoencoderKL.load_config(pipeline_dir / "vae")
    n = len(vae_cfg["block_out_channels"])
    # TAESD's blocks keep one width throughout (its convolutions between blocks do not change
    # the channel count): 64 in the real models, 16 here.
    widths = (16,) * n
    torch.manual_seed(seed)
    vae = AutoencoderTiny(
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        latent_channels=vae_cfg["latent_channels"],
        upsampling_scaling_factor=2,
        num_encoder_blocks=(1,) * n,
        num_decoder_blocks=(1,) * n,
    )
    _randomise(vae, seed)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _randomise(vae: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                w = torch.randn(module.weight.shape, generator=generator)
                module.weight.copy_(w * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.05)
        c = vae.config.latent_channels
        latents = torch.randn(4, c, 16, 16, generator=generator)
        images = torch.rand(4, vae.config.in_channels, 32, 32, generator=generator) * 2 - 1
        for half, x, std in ((vae.decoder, latents, 0.5), (vae.encoder, images, 1.0)):
            last = half.layers[-1]
            if last.bias is None:
                raise RuntimeError("the last convolution has no bias to centre the output")
            # The decoder returns its last convolution's output c as c * 2 - 1 (mean 0 wanted:
            # c centred on 0.5), the encoder returns c itself (centred on 0).
            decoder = half is vae.decoder
            out = half(x)
            conv_mean = out.mean(dim=(0, 2, 3))
            if decoder:
                conv_mean = (conv_mean + 1) / 2
            gain = (std / out.std(dim=(0, 2, 3))).view(-1)
            last.weight.mul_(gain.view(-1, 1, 1, 1))
            last.bias.copy_(gain * (last.bias - conv_mean) + (0.5 if decoder else 0.0))
