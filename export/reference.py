"""`python -m export reference`: diffusers' own TCD text-to-image run, for golden outputs.

The pipeline is diffusers' `StableDiffusionPipeline` / `StableDiffusionXLPipeline` in float32
on CPU with `TCDScheduler.from_config(pipe.scheduler.config)` and
`torch.Generator("cpu").manual_seed(seed)`, exactly what a user of diffusers would run.

Single run::

    python -m export reference --model DIR --prompt "a cat" --steps 4 --eta 0.3 \\
        --guidance 0 --seed 0 --width 64 --height 64 --out-image a.png --out-latents a.npy

Batch mode loads the pipeline once and runs a JSON list of cases (same fields, snake_case,
plus `name`), writing `<name>.png` (first image), `<name>_<i>.png` for every image when there
are several, `<name>.npy` (final latents) and, when a case sets `"intermediates": true`,
`<name>.npz`::

    python -m export reference --model DIR --cases cases.json --out-dir golden/

LoRAs: `--lora FILE[:WEIGHT]` (repeatable) loads each file as its own adapter and calls
`set_adapters(names, adapter_weights)`; `--fuse-lora` then calls `fuse_lora()` over the
unet and text encoders, exactly what a diffusers user writes. In batch mode a case may carry
its own `"loras": [{"file": ..., "weight": ...}]` (paths relative to the cases file) and
`"fuse": true`; cases without `"loras"` use the command line's. After a fused case the
pipeline is reloaded, so later cases start from the unmodified base weights.

Final latents are what `output_type="latent"` returns: the latents after the last scheduler
step, before the VAE (not divided by `scaling_factor`), float32 [num_images, C, H/f, W/f].
The intermediates file holds `initial_latents` (the seeded noise), `timesteps`,
`latents` [steps, num_images, C, h, w] (after each step), `prompt_embeds` (with classifier-free
guidance: negative and positive concatenated on the batch axis, as the UNet sees them) and for
SDXL `add_text_embeds` and `add_time_ids` (same batching).

Image-to-image and inpainting: a case with `"image": PATH` runs diffusers'
`StableDiffusion[XL]Img2ImgPipeline`, one that also has `"mask": PATH` (white = repaint) runs
`StableDiffusion[XL]InpaintPipeline`, both made from the loaded pipeline's components with
`AutoPipelineForImage2Image` / `AutoPipelineForInpainting.from_pipe` (so a model directory
holding a 9-channel inpainting UNet, saved as an inpainting pipeline, runs only inpainting
cases). `"strength"` defaults to the pipeline's own default (`StableDiffusionImg2ImgPipeline`
0.8, `StableDiffusionXLImg2ImgPipeline` 0.3, `StableDiffusionInpaintPipeline` 1.0,
`StableDiffusionXLInpaintPipeline` 0.9999). Paths are relative to `--image-dir` (default: the
cases file's directory; the working directory for a single run). Both files are read with
`PIL.Image.open(path).convert("RGB")` and passed to the pipeline as PIL images, as diffusers'
`load_image` does. Inpainting passes the case's `width` / `height` to the pipeline; the
image-to-image pipelines take no size, so when a case gives one the image is first resized to
it with the pipeline's own `image_processor` (`get_default_height_width` + `resize`, the very
calls `preprocess` makes when the inpainting pipelines get a size), and the pipeline then sees
an image of the right size. Without a size both use the image's size rounded down to a
multiple of the VAE scale factor.

Extra intermediates of image cases (absent where the pipeline never computes them):

* `image`: the preprocessed init image, [1, 3, H, W] in [-1, 1] (after resizing).
* `mask_image`: the preprocessed mask, [1, 1, H, W], binarised (0 keep, 1 repaint).
* `image_latent_parameters` / `masked_image_latent_parameters`: what the VAE encoder returned
  for the init image / the masked image (`latent_dist.parameters`: mean and log-variance on
  channels, the `vae_encoder` graph's `latent_parameters`), [1, 2C, h, w].
* `image_latents`: the init image's latents, sampled from that distribution with the case's
  generator and multiplied by `scaling_factor`, repeated to [num_images, C, h, w]. Inpainting
  with a 9-channel UNet at strength 1 never encodes the init image and has none.
* `noise`: the Gaussian noise drawn for the initial latents, [num_images, C, h, w].
* `latent_timestep`: the timestep the noise is added at (the first of `timesteps`).
* `initial_latents`: the latents entering the loop: `add_noise(image_latents, noise,
  latent_timestep)`, or for inpainting at strength 1 the noise itself (`init_noise_sigma` is 1).
* `mask`: the mask at latent size (nearest-neighbour `interpolate` of `mask_image`),
  [num_images, 1, h, w], and `masked_image_latents`: the latents of `image * (mask_image <
  0.5)`, [num_images, C, h, w]; both without the classifier-free-guidance duplication the
  pipeline adds (both halves are equal). A 4-channel UNet never sees them, but the masked image
  is encoded all the same, drawing from the generator.
* `timesteps`: the timesteps the loop runs (the last `int(steps * strength)` of the
  schedule), `schedule_timesteps`: the scheduler's whole schedule for `steps`, `strength`.
* `latents`: after each step; for inpainting with a 4-channel UNet after the blend
  `(1 - mask) * add_noise(image_latents, noise, next_t) + mask * latents` (at the last step
  `image_latents` unnoised).

ControlNet (text-to-image only): a case with `"controlnets": [{"path": DIR, "scale": 0.5,
"onnx": DIR}, ...]` (diffusers `ControlNetModel` directories relative to the cases file; `onnx`
is the export the Rust tests run and is ignored here) and `"control_images": [PATH, ...]` (one
per ControlNet, relative to `--image-dir`, read with `PIL.Image.open(path).convert("RGB")`)
runs `StableDiffusionControlNetPipeline` / `StableDiffusionXLControlNetPipeline.from_pipe(pipe,
controlnet=...)`, with a `ControlNetModel` for one and a `MultiControlNetModel` for several,
`controlnet_conditioning_scale` = the scales (a float for one ControlNet) and the case's size.
Optional fields: `"control_start"` / `"control_end"` (one number per ControlNet, diffusers'
`control_guidance_start` / `control_guidance_end`, default 0 / 1: ControlNet k is used at step i
of n unless i / n < start_k or (i + 1) / n > end_k), `"control_preprocess": "canny"` with
`"canny_low"` / `"canny_high"` (default 100 / 200): each control image becomes
`cv2.Canny(np.array(image), low, high)` stacked to 3 channels, as diffusers' ControlNet-canny
examples do, and batch mode saves it as `<name>_control_<i>.png`. Extra intermediates:

* `control_image_{i}`: ControlNet i's image as `prepare_image` returned it (resized to the
  case's size with the pipeline's `control_image_processor`, RGB in [0, 1]), repeated to
  [num_images, 3, H, W], without the classifier-free-guidance duplication.
* `control_scales`: [steps, n_controlnets], the `conditioning_scale` each ControlNet got at each
  step: its scale times 1 or 0 (inside or outside its start/end window).
* `control_down_{j}` / `control_mid`: the residuals the UNet received at the first step, i.e.
  the ControlNet outputs multiplied by their scale and summed over the ControlNets (what the UNet
  graph's `down_block_additional_residual_{j}` / `mid_block_additional_residual` take), with the
  guidance batch (negative half first) when guidance runs: [batch, C_j, h_j, w_j].

Tiny VAE: `--vae-tiny DIR_OR_ID` sets `pipe.vae` to that `AutoencoderTiny` (TAESD) before
anything runs, so every task decodes (and image tasks encode) with it. Its encoder returns
latents, not a distribution: diffusers' `retrieve_latents` takes them as they are and draws
nothing from the generator, so the noise comes first out of it. The intermediates then have
`image_encoder_latents` / `masked_image_encoder_latents` (the `vae_encoder` graph's `latents`,
[1, C, h, w], before `scaling_factor`) instead of the `*_latent_parameters`.

IP-Adapter (batch mode, any task): a case with `"ip_adapter": {"path", "subfolder",
"weight_name"}`, `"ip_adapter_image"` and `"ip_adapter_scale"` runs with diffusers'
`load_ip_adapter` / `set_ip_adapter_scale` and `ip_adapter_image=`; the fields and the extra
intermediates (`ip_pixel_values`, `ip_image_embeds`, `noise_pred_0`) are in
export/reference_ip.py.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from export import reference_ip
from export.errors import UserError
from export.lora import LoraSpec, load_loras, lora_components, parse_lora_spec, resolve_lora
from export.sources import load_pipeline


@dataclass
class Case:
    prompt: str
    steps: int = 4
    eta: float = 0.3
    guidance: float = 0.0
    seed: int = 0
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None
    num_images: int = 1
    name: str = "image"
    intermediates: bool = False
    loras: list[Any] | None = None
    fuse: bool = False
    image: str | None = None
    mask: str | None = None
    strength: float | None = None
    controlnets: list[Any] | None = None
    control_images: list[Any] | None = None
    control_start: list[Any] | None = None
    control_end: list[Any] | None = None
    control_preprocess: str | None = None
    canny_low: float = 100
    canny_high: float = 200
    ip_adapter: dict[str, Any] | None = None
    ip_adapter_image: str | None = None
    ip_adapter_scale: float | None = None

    @classmethod
    def from_json(cls, obj: Any, index: int) -> Case:
        if not isinstance(obj, dict):
            raise UserError(f"case {index}: expected a JSON object, got {type(obj).__name__}")
        known = {f.name for f in fields(cls)}
        norm = {k.replace("-", "_"): v for k, v in obj.items()}
        unknown = sorted(set(norm) - known)
        if unknown:
            raise UserError(f"case {index}: unknown field(s) {', '.join(unknown)}")
        if "prompt" not in norm or "name" not in norm:
            raise UserError(f"case {index}: 'name' and 'prompt' are required")
        case = cls(**norm)
        case.validate(f"case {case.name!r}")
        return case

    def validate(self, what: str) -> None:
        if self.steps < 1:
            raise UserError(f"{what}: steps must be >= 1")
        if not 0.0 <= self.eta <= 1.0:
            raise UserError(f"{what}: eta must be in [0, 1]")
        if self.num_images < 1:
            raise UserError(f"{what}: num_images must be >= 1")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise UserError(f"{what}: name must be a plain file name")
        if self.loras is not None:
            if not isinstance(self.loras, list):
                raise UserError(f"{what}: loras must be a list of {{\"file\", \"weight\"}}")
            for item in self.loras:
                if not isinstance(item, dict) or not isinstance(item.get("file"), str):
                    raise UserError(f"{what}: each lora needs a \"file\"")
                unknown = sorted(set(item) - {"file", "weight"})
                if unknown:
                    raise UserError(f"{what}: unknown lora field(s) {', '.join(unknown)}")
                if not isinstance(item.get("weight", 1.0), (int, float)):
                    raise UserError(f"{what}: lora weight must be a number")
        if self.fuse and not self.loras:
            raise UserError(f"{what}: fuse needs loras")
        for key in ("image", "mask"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise UserError(f"{what}: {key} must be a file path")
        if self.mask is not None and self.image is None:
            raise UserError(f"{what}: a mask needs an image to inpaint")
        if self.strength is not None:
            if self.image is None:
                raise UserError(f"{what}: strength needs an image (image-to-image, inpainting)")
            if not isinstance(self.strength, (int, float)) or not 0.0 < self.strength <= 1.0:
                raise UserError(f"{what}: strength must be in (0, 1]")
        self._validate_controlnets(what)
        reference_ip.validate(self, what)

    def _validate_controlnets(self, what: str) -> None:
        nets = self.controlnets
        if nets is None:
            for key in ("control_images", "control_start", "control_end", "control_preprocess"):
                if getattr(self, key) is not None:
                    raise UserError(f"{what}: {key} needs controlnets")
            return
        if not isinstance(nets, list) or not nets:
            raise UserError(
                f"{what}: controlnets must be a non-empty list of {{\"path\", \"scale\"}}"
            )
        for item in nets:
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                raise UserError(f"{what}: each controlnet needs a \"path\"")
            unknown = sorted(set(item) - {"path", "onnx", "scale"})
            if unknown:
                raise UserError(f"{what}: unknown controlnet field(s) {', '.join(unknown)}")
            if not _is_number(item.get("scale", 1.0)):
                raise UserError(f"{what}: controlnet scale must be a number")
        if self.image is not None:
            raise UserError(f"{what}: ControlNet cases are text-to-image only (no image/mask)")
        images = self.control_images
        if not isinstance(images, list) or len(images) != len(nets):
            raise UserError(f"{what}: control_images needs one image path per controlnet")
        if not all(isinstance(p, str) and p for p in images):
            raise UserError(f"{what}: control_images must be file paths")
        for key in ("control_start", "control_end"):
            value = getattr(self, key)
            if value is None:
                continue
            if not isinstance(value, list) or len(value) != len(nets):
                raise UserError(f"{what}: {key} needs one number per controlnet")
            if not all(_is_number(v) and 0.0 <= v <= 1.0 for v in value):
                raise UserError(f"{what}: {key} values must be in [0, 1]")
        start, end = self.control_window()
        if any(s >= e for s, e in zip(start, end, strict=True)):
            raise UserError(f"{what}: each control_start must be below its control_end")
        if self.control_preprocess not in (None, "canny"):
            raise UserError(f"{what}: control_preprocess must be \"canny\"")
        if not (_is_number(self.canny_low) and _is_number(self.canny_high)):
            raise UserError(f"{what}: canny_low and canny_high must be numbers")

    def control_window(self) -> tuple[list[float], list[float]]:
        """diffusers' control_guidance_start / _end, one per ControlNet (default 0 / 1)."""
        n = len(self.controlnets or [])
        start = [float(v) for v in self.control_start] if self.control_start else [0.0] * n
        end = [float(v) for v in self.control_end] if self.control_end else [1.0] * n
        return start, end

    def control_scales(self) -> list[float]:
        return [float(item.get("scale", 1.0)) for item in self.controlnets or []]

    def controlnet_paths(self, base: pathlib.Path) -> list[pathlib.Path]:
        """The case's ControlNet (diffusers) directories resolved against `base`; checks them."""
        out = []
        for item in self.controlnets or []:
            path = pathlib.Path(item["path"]).expanduser()
            path = path if path.is_absolute() else base / path
            if not (path / "config.json").is_file():
                raise UserError(f"case {self.name!r}: controlnet {path}: no config.json there")
            out.append(path)
        return out

    def control_image_paths(self, base: pathlib.Path) -> list[pathlib.Path]:
        out = []
        for value in self.control_images or []:
            path = pathlib.Path(value).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise UserError(f"case {self.name!r}: control image {path}: no such file")
            out.append(path)
        return out

    @property
    def task(self) -> str:
        if self.controlnets is not None:
            return "controlnet"
        if self.image is None:
            return "text2img"
        return "img2img" if self.mask is None else "inpaint"

    def image_paths(self, base: pathlib.Path) -> dict[str, pathlib.Path]:
        """The case's image files (`image`, `mask`) resolved against `base`; checks they exist."""
        out = {}
        for key in ("image", "mask"):
            value = getattr(self, key)
            if value is None:
                continue
            path = pathlib.Path(value).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise UserError(f"case {self.name!r}: {key} {path}: no such file")
            out[key] = path
        return out

    def lora_specs(self, base: pathlib.Path) -> list[Any]:
        out = []
        for item in self.loras or []:
            path = pathlib.Path(item["file"]).expanduser()
            path = path if path.is_absolute() else base / path
            out.append(resolve_lora(LoraSpec(str(path), float(item.get("weight", 1.0)))))
        return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Result:
    images: list[Any]
    latents: np.ndarray
    intermediates: dict[str, np.ndarray]
    # The control images the pipeline was given (after `control_preprocess`), one per ControlNet.
    control_images: list[Any] = field(default_factory=list)


def load_reference_pipeline(model: str, vae_tiny: str | None = None) -> Any:
    """The pipeline with TCDScheduler; `vae_tiny` (an AutoencoderTiny dir or hub id) replaces
    its VAE, as `pipe.vae = AutoencoderTiny.from_pretrained(...)` does for a diffusers user."""
    from diffusers import TCDScheduler

    pipe = load_pipeline(model)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    if vae_tiny is not None:
        from export.vae_tiny import load_vae_tiny

        pipe.vae = load_vae_tiny(vae_tiny).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def apply_loras(pipe: Any, specs: list[Any], fuse: bool) -> None:
    """Load `specs` as adapters with set_adapters weights; fuse them when asked."""
    names = load_loras(pipe, specs)
    if fuse and names:
        pipe.fuse_lora(components=lora_components(pipe), adapter_names=names)


def canny_control_image(image: Any, low: float, high: float) -> Any:
    """diffusers' ControlNet-canny preprocessing: OpenCV's Canny of the RGB array, as 3 channels."""
    import cv2
    from PIL import Image

    edges = cv2.Canny(np.array(image), low, high)
    return Image.fromarray(np.concatenate([edges[:, :, None]] * 3, axis=2))


def load_controlnets(paths: list[pathlib.Path], cache: dict[str, Any] | None = None) -> Any:
    """One `ControlNetModel`, or a `MultiControlNetModel` of several, float32 on CPU."""
    import torch
    from diffusers import ControlNetModel, MultiControlNetModel

    cache = {} if cache is None else cache
    nets = []
    for path in paths:
        key = str(path.resolve())
        if key not in cache:
            cache[key] = ControlNetModel.from_pretrained(path, torch_dtype=torch.float32).eval()
        nets.append(cache[key])
    return nets[0] if len(nets) == 1 else MultiControlNetModel(nets)


def controlnet_pipeline(pipe: Any, controlnet: Any) -> Any:
    """diffusers' ControlNet text-to-image pipeline for `pipe`'s family, sharing its components."""
    from diffusers import (
        MultiControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    nets = controlnet.nets if isinstance(controlnet, MultiControlNetModel) else [controlnet]
    for net in nets:
        net_sdxl = net.config.addition_embed_type == "text_time"
        if net_sdxl != sdxl:
            raise UserError(
                f"a {'SDXL' if net_sdxl else 'SD'} ControlNet cannot run with this "
                f"{'SDXL' if sdxl else 'SD'} pipeline"
            )
    cls = StableDiffusionXLControlNetPipeline if sdxl else StableDiffusionControlNetPipeline
    runner = cls.from_pipe(pipe, controlnet=controlnet)
    runner.set_progress_bar_config(disable=True)
    return runner


def task_pipeline(pipe: Any, task: str, controlnet: Any = None) -> Any:
    """The pipeline diffusers runs `task` with, sharing `pipe`'s components."""
    from diffusers import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
    )

    in_channels = pipe.unet.config.in_channels
    if in_channels != 4 and task != "inpaint":
        raise UserError(
            f"this model's UNet takes {in_channels} input channels (an inpainting model): "
            "give every case an image and a mask"
        )
    if task == "controlnet":
        return controlnet_pipeline(pipe, controlnet)
    auto = {
        "text2img": AutoPipelineForText2Image,
        "img2img": AutoPipelineForImage2Image,
        "inpaint": AutoPipelineForInpainting,
    }[task]
    if task == "text2img" and "Img2Img" not in type(pipe).__name__ and "Inpaint" not in type(
        pipe
    ).__name__:
        return pipe
    runner = auto.from_pipe(pipe)
    runner.set_progress_bar_config(disable=True)
    return runner


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def run_case(
    pipe: Any,
    case: Case,
    image_base: pathlib.Path | None = None,
    base: pathlib.Path | None = None,
    controlnet_cache: dict[str, Any] | None = None,
) -> Result:
    """Run one case; `image_base` resolves relative image, mask and control image paths,
    `base` ControlNet paths (both default: cwd). `controlnet_cache` keeps loaded ControlNets
    across cases."""
    import inspect

    import torch
    from PIL import Image

    task = case.task
    image_base = image_base or pathlib.Path.cwd()
    controlnet = None
    control_images: list[Any] = []
    if task == "controlnet":
        controlnet = load_controlnets(
            case.controlnet_paths(base or pathlib.Path.cwd()), controlnet_cache
        )
        control_images = [
            Image.open(p).convert("RGB") for p in case.control_image_paths(image_base)
        ]
        if case.control_preprocess == "canny":
            control_images = [
                canny_control_image(im, case.canny_low, case.canny_high) for im in control_images
            ]
    runner = task_pipeline(pipe, task, controlnet)
    images = {
        key: Image.open(path).convert("RGB")
        for key, path in case.image_paths(image_base).items()
    }
    steps: list[np.ndarray] = []
    timesteps: list[float] = []
    extra: dict[str, np.ndarray] = {}
    wanted = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    tensor_inputs = [k for k in wanted if k in getattr(runner, "_callback_tensor_inputs", [])]
    n = case.num_images
    phase: list[str] = []  # which prepare_* call is running, for the VAE-encode capture

    def on_step_end(_pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        steps.append(_np(kwargs["latents"]))
        timesteps.append(float(t))
        if i == 0:
            for k in tensor_inputs[1:]:
                extra[k] = _np(kwargs[k])
        return {}

    patched: list[tuple[Any, str]] = []

    def patch(obj: Any, name: str, wrapper: Any) -> None:
        setattr(obj, name, wrapper(getattr(obj, name)))
        patched.append((obj, name))

    def prepare_latents(fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            phase.append("image")
            try:
                out = fn(*args, **kwargs)
            finally:
                phase.pop()
            if isinstance(out, tuple):  # the inpainting pipelines: latents, noise[, image latents]
                extra["initial_latents"] = _np(out[0])
                extra["noise"] = _np(out[1])
                if len(out) > 2:
                    extra["image_latents"] = _np(out[2])
            else:
                extra["initial_latents"] = _np(out)
            return out

        return wrapped

    def prepare_mask_latents(fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            phase.append("masked_image")
            try:
                mask, masked = fn(*args, **kwargs)
            finally:
                phase.pop()
            extra["mask"] = _np(mask[-n:])
            if masked is not None:
                extra["masked_image_latents"] = _np(masked[-n:])
            return mask, masked

        return wrapped

    def add_noise(fn: Any) -> Any:
        def wrapped(original: Any, noise: Any, t: Any) -> Any:
            if phase == ["image"]:  # the initial latents, not the 4-channel inpainting blend
                extra["image_latents"] = _np(original)
                extra["noise"] = _np(noise)
                extra["latent_timestep"] = _np(t.reshape(-1)[:1])
            return fn(original, noise, t)

        return wrapped

    def vae_encode(fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            if phase and hasattr(out, "latent_dist"):
                extra[f"{phase[-1]}_latent_parameters"] = _np(out.latent_dist.parameters)
            elif phase:  # AutoencoderTiny: latents, no distribution
                extra[f"{phase[-1]}_encoder_latents"] = _np(out.latents)
            return out

        return wrapped

    def preprocess(key: str) -> Any:
        def wrapper(fn: Any) -> Any:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                out = fn(*args, **kwargs)
                extra[key] = _np(out)
                return out

            return wrapped

        return wrapper

    prepared_control: list[Any] = []
    control_scales: list[list[float]] = []

    def prepare_image(fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            prepared_control.append(_np(out[-n:]))  # without the guidance duplication
            return out

        return wrapped

    def controlnet_forward(fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            scale = kwargs["conditioning_scale"]
            scales = scale if isinstance(scale, list) else [scale]
            control_scales.append([float(v) for v in scales])
            if len(control_scales) == 1:
                down, mid = out
                for j, d in enumerate(down):
                    extra[f"control_down_{j}"] = _np(d)
                extra["control_mid"] = _np(mid)
            return out

        return wrapped

    kwargs: dict[str, Any] = {}
    patch(runner, "prepare_latents", prepare_latents)
    if task == "text2img":
        kwargs.update(width=case.width, height=case.height)
    elif task == "controlnet":
        single = len(control_images) == 1
        start, end = case.control_window()
        scales = case.control_scales()
        kwargs.update(
            width=case.width,
            height=case.height,
            image=control_images[0] if single else control_images,
            controlnet_conditioning_scale=scales[0] if single else scales,
            control_guidance_start=start[0] if single else start,
            control_guidance_end=end[0] if single else end,
        )
        patch(runner, "prepare_image", prepare_image)
        patch(runner.controlnet, "forward", controlnet_forward)
    else:
        strength = case.strength
        if strength is None:
            strength = inspect.signature(runner.__call__).parameters["strength"].default
        extra["strength"] = np.asarray(strength, dtype=np.float32)
        image = images["image"]
        if task == "img2img":
            # The img2img pipelines take no size: resize exactly as preprocess(height=, width=)
            # would, so the pipeline's own preprocess finds the size already right.
            proc = runner.image_processor
            height, width = proc.get_default_height_width(image, case.height, case.width)
            if image.size != (width, height):
                image = proc.resize(image, height, width)
        else:
            kwargs.update(width=case.width, height=case.height, mask_image=images["mask"])
            patch(runner, "prepare_mask_latents", prepare_mask_latents)
            patch(runner.mask_processor, "preprocess", preprocess("mask_image"))
        kwargs.update(image=image, strength=strength)
        patch(runner.image_processor, "preprocess", preprocess("image"))
        patch(runner.scheduler, "add_noise", add_noise)
        patch(runner.vae, "encode", vae_encode)
    kwargs.update(reference_ip.prepare(runner, case, image_base, extra, patch))
    try:
        out = runner(
            prompt=case.prompt,
            negative_prompt=case.negative_prompt,
            num_inference_steps=case.steps,
            guidance_scale=case.guidance,
            eta=case.eta,
            num_images_per_prompt=case.num_images,
            generator=torch.Generator("cpu").manual_seed(case.seed),
            output_type="pil",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=tensor_inputs,
            **kwargs,
        )
    except ValueError as exc:  # diffusers' own argument checks (sizes, prompts, strength)
        raise UserError(f"case {case.name!r}: {exc}") from exc
    finally:
        for obj, name in patched:
            # Each was an instance attribute set over a class attribute: deleting restores it.
            delattr(obj, name)
    for i, image in enumerate(prepared_control):
        extra[f"control_image_{i}"] = image
    if control_scales:
        extra["control_scales"] = np.asarray(control_scales, dtype=np.float32)
    if task in ("text2img", "controlnet"):
        extra["timesteps"] = runner.scheduler.timesteps.detach().float().cpu().numpy()
    else:
        extra["timesteps"] = np.asarray(timesteps, dtype=np.float32)
        extra["schedule_timesteps"] = _np(runner.scheduler.timesteps)
    extra["latents"] = np.stack(steps).astype(np.float32)
    return Result(out.images, steps[-1].astype(np.float32), extra, control_images)


def _write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v.astype(np.float32) for k, v in arrays.items()})


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.cases is not None:
        if args.out_dir is None:
            parser.error("--cases needs --out-dir")
        if not args.cases.is_file():
            parser.error(f"--cases {args.cases}: no such file")
        try:
            raw = json.loads(args.cases.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            parser.error(f"--cases {args.cases}: invalid JSON: {exc}")
        if not isinstance(raw, list):
            parser.error(f"--cases {args.cases}: expected a JSON list of cases")
        if args.image is not None or args.mask is not None or args.strength is not None:
            parser.error("--image, --mask and --strength are per case in batch mode")
        cases = [Case.from_json(obj, i) for i, obj in enumerate(raw)]
        if args.fuse_lora and not args.lora:
            parser.error("--fuse-lora needs --lora")
        for case in cases:
            if case.loras is None and args.lora:
                # Command-line paths are relative to the working directory: make them absolute.
                case.loras = [_cli_lora(s, absolute=True) for s in args.lora]
                case.fuse = bool(args.fuse_lora)
        names = [c.name for c in cases]
        if len(set(names)) != len(names):
            parser.error(f"--cases {args.cases}: case names must be unique")
        run_batch(
            args.model, cases, args.out_dir, args.cases.parent, args.image_dir, args.vae_tiny
        )
        return

    if args.prompt is None:
        parser.error("reference needs --prompt (or --cases)")
    if args.out_image is None and args.out_latents is None and args.out_dir is None:
        parser.error("reference needs at least one of --out-image, --out-latents, --out-dir")
    case = Case(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        eta=args.eta,
        guidance=args.guidance,
        seed=args.seed,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        image=None if args.image is None else str(args.image),
        mask=None if args.mask is None else str(args.mask),
        strength=args.strength,
    )
    if args.lora:
        case.loras = [_cli_lora(s) for s in args.lora]
    case.fuse = bool(args.fuse_lora)
    case.validate("reference")
    pipe = load_reference_pipeline(args.model, args.vae_tiny)
    apply_loras(pipe, case.lora_specs(pathlib.Path.cwd()), case.fuse)
    result = run_case(pipe, case, args.image_dir)
    if args.out_image is not None:
        args.out_image.parent.mkdir(parents=True, exist_ok=True)
        result.images[0].save(args.out_image)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(result.images):
            image.save(args.out_dir / f"image_{i}.png")
    if args.out_latents is not None:
        args.out_latents.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.out_latents, result.latents)
    if args.out_intermediates is not None:
        _write_npz(args.out_intermediates, result.intermediates)


def _cli_lora(text: str, absolute: bool = False) -> dict[str, Any]:
    spec = parse_lora_spec(text)
    path = pathlib.Path(spec.source).expanduser()
    return {"file": str(path.resolve()) if absolute else str(path), "weight": spec.weight}


def run_batch(
    model: str,
    cases: list[Case],
    out_dir: pathlib.Path,
    base: pathlib.Path | None = None,
    image_base: pathlib.Path | None = None,
    vae_tiny: str | None = None,
) -> None:
    """Run `cases` on one pipeline; LoRA files in cases are relative to `base` (the cases file's
    directory), image and mask files to `image_base` (default `base`); `vae_tiny` replaces the
    pipeline's VAE with that AutoencoderTiny."""
    import logging

    log = logging.getLogger("export")
    base = pathlib.Path.cwd() if base is None else base
    image_base = base if image_base is None else image_base
    # Check every file before running any case.
    specs = [case.lora_specs(base) for case in cases]
    for case in cases:
        case.image_paths(image_base)
        case.controlnet_paths(base)
        case.control_image_paths(image_base)
        reference_ip.check_files(case, base, image_base)
    controlnets: dict[str, Any] = {}
    ip_adapters = reference_ip.Loaded()
    pipe = load_reference_pipeline(model, vae_tiny)
    out_dir.mkdir(parents=True, exist_ok=True)
    for n, case in enumerate(cases):
        if specs[n]:
            apply_loras(pipe, specs[n], case.fuse)
        ip_adapters.apply(pipe, case, base)
        try:
            result = run_case(pipe, case, image_base, base, controlnets)
        finally:
            if specs[n]:
                if case.fuse and n + 1 < len(cases):
                    # unfuse_lora subtracts the delta back, leaving rounding noise in the base
                    # weights; a fresh pipeline keeps the later cases exact.
                    pipe = load_reference_pipeline(model, vae_tiny)
                else:
                    pipe.unload_lora_weights()
        result.images[0].save(out_dir / f"{case.name}.png")
        if len(result.images) > 1:
            for i, image in enumerate(result.images):
                image.save(out_dir / f"{case.name}_{i}.png")
        if case.control_preprocess is not None:
            for i, image in enumerate(result.control_images):
                image.save(out_dir / f"{case.name}_control_{i}.png")
        np.save(out_dir / f"{case.name}.npy", result.latents)
        if case.intermediates:
            _write_npz(out_dir / f"{case.name}.npz", result.intermediates)
        log.info("reference %s", case.name)
