"""The VAE, split as optimum does into `vae_decoder/` and `vae_encoder/`.

* `vae_decoder`: input `latent_sample` [batch, latent_channels, height, width], already divided
  by `scaling_factor`; output `sample` [batch, 3, image_height, image_width], unclamped.
* `vae_encoder`: input `sample` [batch, 3, height, width] in [-1, 1]; output
  `latent_parameters` [batch, 2 * latent_channels, latent_height, latent_width], the
  DiagonalGaussianDistribution's `parameters` (mean and log-variance concatenated on channels)
  so the engine draws the sample with its own seeded noise, as diffusers does. Like diffusers,
  the engine must clamp the log-variance to [-30, 20] before use.

Both directories get the full VAE `config.json` (for `scaling_factor`, `block_out_channels`).

Inputs and outputs have the VAE's dtype: float32 unless `convert --vae-dtype fp16`.
"""

from __future__ import annotations

import pathlib

import onnx
import torch

from export.onnx_io import Io, export_component, module_dtype


class _Decoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _Encoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample).latent_dist.parameters


def vae_scale_factor(vae: torch.nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def prepare_for_export(vae: torch.nn.Module) -> None:
    # Tiled / sliced paths add Python control flow on the image size; the engine tiles itself.
    for name in ("disable_tiling", "disable_slicing"):
        fn = getattr(vae, name, None)
        if fn is not None:
            fn()


def export_vae_decoder(
    vae: torch.nn.Module, out_dir: pathlib.Path, opset: int, attention: str = "fused"
) -> onnx.ModelProto:
    prepare_for_export(vae)
    latent = torch.randn(2, vae.config.latent_channels, 24, 40, dtype=module_dtype(vae))
    model = export_component(
        _Decoder(vae),
        (latent,),
        [Io("latent_sample", {0: "batch", 2: "height", 3: "width"})],
        [Io("sample", {0: "batch", 2: "image_height", 3: "image_width"})],
        out_dir,
        opset,
        prefix="vae.",
        attention=attention,
    )
    vae.save_config(out_dir)
    return model


def export_vae_encoder(
    vae: torch.nn.Module, out_dir: pathlib.Path, opset: int, attention: str = "fused"
) -> onnx.ModelProto:
    prepare_for_export(vae)
    f = vae_scale_factor(vae)
    image = (torch.rand(2, vae.config.in_channels, 24 * f, 40 * f) * 2 - 1).to(module_dtype(vae))
    model = export_component(
        _Encoder(vae),
        (image,),
        [Io("sample", {0: "batch", 2: "height", 3: "width"})],
        [Io("latent_parameters", {0: "batch", 2: "latent_height", 3: "latent_width"})],
        out_dir,
        opset,
        prefix="vae.",
        attention=attention,
    )
    vae.save_config(out_dir)
    return model
