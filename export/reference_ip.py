"""IP-Adapter cases of `python -m export reference` (issue #20).

A case with `"ip_adapter": {"path": DIR, "subfolder": "models", "weight_name": FILE, "onnx":
DIR}` (an IP-Adapter source laid out like h94/IP-Adapter, relative to the cases file; `onnx` is
the export the Rust tests run and is ignored here), `"ip_adapter_image": PATH` (relative to
`--image-dir`, read with `PIL.Image.open(path).convert("RGB")`) and optional
`"ip_adapter_scale"` (default 1.0, diffusers' own after `load_ip_adapter`) runs the case's
pipeline, whatever its task, with `ip_adapter_image=` that image, after

    pipe.load_ip_adapter(path, subfolder=subfolder, weight_name=weight_name)
    pipe.set_ip_adapter_scale(scale)

exactly what a diffusers user writes. An adapter stays loaded over consecutive cases that name
the same one; before another adapter, or a case without one, `pipe.unload_ip_adapter()` runs
(so the next adapter's own image encoder is loaded). The image processor is the one
`load_ip_adapter` registers: `CLIPImageProcessor(size=S, crop_size=S)` with S the encoder's
`image_size` (the pipeline has none of its own), which resizes the shorter side to S and
crops the centre.

Extra intermediates of IP-Adapter cases:

* `ip_pixel_values`: what the feature extractor made of the reference image, the image encoder's
  input, [1, 3, S, S].
* `ip_image_embeds`: what diffusers passes the UNet as `added_cond_kwargs["image_embeds"][0]`,
  the image encoder's output repeated per image and, with guidance, the unconditional half
  first, without the axis of images per adapter (always one here, so this is the
  `image_projection` graph's input): [batch, projection_dim] (`image_embeds`) for plain
  adapters, [batch, patches + 1, hidden] (`hidden_states[-2]`) for plus ones; batch is
  num_images, or 2 * num_images with guidance. The unconditional rows are zeros for plain
  adapters and the encoder's output for an all-zero `pixel_values` for plus ones.
* `noise_pred_0`: the UNet's output at the first step, before the guidance combination, with
  the guidance batch: [batch, C, h, w].
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from export.errors import UserError

FIELDS = {"path", "subfolder", "weight_name", "onnx"}
DEFAULT_SUBFOLDER = "models"


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def validate(case: Any, what: str) -> None:
    """Checks the case's IP-Adapter fields (their types; the files in `check_files`)."""
    spec = case.ip_adapter
    if spec is None:
        for key in ("ip_adapter_image", "ip_adapter_scale"):
            if getattr(case, key) is not None:
                raise UserError(f"{what}: {key} needs ip_adapter")
        return
    if not isinstance(spec, dict):
        raise UserError(f"{what}: ip_adapter must be {{\"path\", \"subfolder\", \"weight_name\"}}")
    unknown = sorted(set(spec) - FIELDS)
    if unknown:
        raise UserError(f"{what}: unknown ip_adapter field(s) {', '.join(unknown)}")
    if not isinstance(spec.get("path"), str) or not isinstance(spec.get("weight_name"), str):
        raise UserError(f"{what}: ip_adapter needs a \"path\" and a \"weight_name\"")
    if not isinstance(spec.get("subfolder", DEFAULT_SUBFOLDER), str):
        raise UserError(f"{what}: ip_adapter subfolder must be a string")
    if not isinstance(case.ip_adapter_image, str) or not case.ip_adapter_image:
        raise UserError(f"{what}: ip_adapter needs an ip_adapter_image file path")
    scale = case.ip_adapter_scale
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        raise UserError(f"{what}: ip_adapter_scale must be a number")


def _resolve(value: str, base: pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(value).expanduser()
    return path if path.is_absolute() else base / path


def check_files(case: Any, base: pathlib.Path, image_base: pathlib.Path) -> None:
    """The adapter's weights file and the reference image exist (before any case runs)."""
    if case.ip_adapter is None:
        return
    root = _resolve(case.ip_adapter["path"], base)
    subfolder = case.ip_adapter.get("subfolder", DEFAULT_SUBFOLDER)
    weights = root / subfolder / case.ip_adapter["weight_name"]
    if not weights.is_file():
        raise UserError(f"case {case.name!r}: ip_adapter weights {weights}: no such file")
    image = _resolve(case.ip_adapter_image, image_base)
    if not image.is_file():
        raise UserError(f"case {case.name!r}: ip_adapter_image {image}: no such file")


class Loaded:
    """Which IP-Adapter is loaded on which pipeline: `apply` loads, swaps or unloads one as
    each case needs and sets its scale."""

    def __init__(self) -> None:
        self.pipe: Any = None
        self.key: tuple[str, str, str] | None = None

    def apply(self, pipe: Any, case: Any, base: pathlib.Path) -> None:
        key = None
        if case.ip_adapter is not None:
            spec = case.ip_adapter
            root = _resolve(spec["path"], base).resolve()
            key = (str(root), spec.get("subfolder", DEFAULT_SUBFOLDER), spec["weight_name"])
        if self.pipe is not pipe:
            # A pipeline this has not seen (the first, or a reload after a fused LoRA) has none.
            self.pipe, self.key = pipe, None
        if self.key != key:
            if self.key is not None:
                pipe.unload_ip_adapter()
                self.key = None
            if key is not None:
                pipe.load_ip_adapter(key[0], subfolder=key[1], weight_name=key[2])
                self.key = key
        if key is not None:
            scale = case.ip_adapter_scale
            pipe.set_ip_adapter_scale(1.0 if scale is None else float(scale))


def prepare(
    runner: Any, case: Any, image_base: pathlib.Path, extra: dict[str, np.ndarray], patch: Any
) -> dict[str, Any]:
    """The pipeline arguments of the case's IP-Adapter (none without one); installs, through
    reference.run_case's `patch`, the captures of `ip_pixel_values`, `ip_image_embeds` and
    `noise_pred_0` into `extra`."""
    if case.ip_adapter is None:
        return {}
    from PIL import Image

    image = Image.open(_resolve(case.ip_adapter_image, image_base)).convert("RGB")

    def encoder_forward(fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            # The first call sees the reference image; plus adapters' second the zero image.
            if "ip_pixel_values" not in extra:
                pixels = kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]
                extra["ip_pixel_values"] = _np(pixels)
            return fn(*args, **kwargs)

        return wrapped

    def unet_forward(fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            if "noise_pred_0" not in extra:
                embeds = kwargs["added_cond_kwargs"]["image_embeds"][0]
                extra["ip_image_embeds"] = _np(embeds[:, 0])
                extra["noise_pred_0"] = _np(out[0] if isinstance(out, tuple) else out.sample)
            return out

        return wrapped

    patch(runner.image_encoder, "forward", encoder_forward)
    patch(runner.unet, "forward", unet_forward)
    return {"ip_adapter_image": image}
