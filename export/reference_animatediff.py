"""`python -m export reference --motion-adapter DIR --cases cases.json --out-dir OUT`: diffusers'
own AnimateDiff TCD text-to-video runs, for golden outputs.

The pipeline is diffusers' `AnimateDiffPipeline` made from the `--model` pipeline's components
and `MotionAdapter.from_pretrained(DIR)` (export/animatediff.py's `motion_pipeline`, the same
pipeline `python -m export animatediff` exports), float32 on CPU, with
`TCDScheduler.from_config(pipe.scheduler.config)` and
`torch.Generator("cpu").manual_seed(seed)`: one call per case with `output_type="pil"`; the
final latents are taken from the same call at its last step (`callback_on_step_end`), which is
what `output_type="latent"` returns.

A case is a JSON object with `name`, `prompt`, `negative_prompt`, `frames` (num_frames),
`steps`, `eta`, `guidance` (guidance_scale), `seed`, `width`, `height` (default: the UNet's
sample_size times the VAE scale factor), `decode_chunk` (decode_chunk_size, default 16),
`loras` ([{"file", "weight"}], relative to the cases file: loaded as adapters with
`set_adapters(names, adapter_weights)`), `fuse` (fuse them first), `fused_loras` (the same, for
LoRAs the engine's model directory has fused in: the reference loads and fuses them, the engine
applies nothing), `model` (the export the engine runs; ignored here) and `intermediates`.
After a case that fused LoRAs the pipeline is reloaded.

A LoRA file in the original AnimateDiff motion LoRA layout (no `unet.` prefix,
`temporal_transformer`, `attention_blocks.N`, as guoyww's v2_lora_*.ckpt are) is converted with
the mapping of diffusers' scripts/convert_animatediff_motion_lora_to_diffusers.py
(export/lora.py's `motion_lora_to_diffusers`) before diffusers loads it: `load_lora_weights`
reads only the converted layout.

Writes per case `<name>.npy`: final latents, float32 [1, C, frames, h, w] (not divided by the
VAE's scaling_factor), `<name>_frames.npy`: the frames as uint8 [frames, H, W, 3]
(`np.asarray` of each PIL frame), and with `"intermediates": true` `<name>.npz`: `timesteps`,
`initial_latents` (the seeded noise, [1, C, frames, h, w]), `latents` [steps, 1, C, frames, h, w]
after each step and `prompt_embeds` [batch, sequence, dim]: one row per video (negative first
with guidance), the motion UNet graph's `encoder_hidden_states` (the pipeline repeats them over
the frames before its UNet call).
"""

from __future__ import annotations

import argparse
import json
import pathlib
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from export.errors import UserError
from export.lora import LoraSpec, load_loras, lora_components, resolve_lora


@dataclass
class VideoCase:
    name: str
    prompt: str
    frames: int = 16
    steps: int = 4
    eta: float = 0.3
    guidance: float = 0.0
    seed: int = 0
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None
    decode_chunk: int = 16
    loras: list[Any] | None = None
    fuse: bool = False
    fused_loras: list[Any] | None = None
    model: str | None = None
    intermediates: bool = False

    @classmethod
    def from_json(cls, obj: Any, index: int) -> VideoCase:
        if not isinstance(obj, dict):
            raise UserError(f"case {index}: expected a JSON object, got {type(obj).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise UserError(f"case {index}: unknown field(s) {', '.join(unknown)}")
        if "prompt" not in obj or "name" not in obj:
            raise UserError(f"case {index}: 'name' and 'prompt' are required")
        case = cls(**obj)
        what = f"case {case.name!r}"
        if not case.name or "/" in case.name or case.name.startswith("."):
            raise UserError(f"{what}: name must be a plain file name")
        for key in ("frames", "steps", "decode_chunk"):
            value = getattr(case, key)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{what}: {key} must be a positive integer")
        if not 0.0 <= case.eta <= 1.0:
            raise UserError(f"{what}: eta must be in [0, 1]")
        for key in ("loras", "fused_loras"):
            items = getattr(case, key)
            if items is None:
                continue
            if not isinstance(items, list) or not all(_is_lora_item(i) for i in items):
                raise UserError(f"{what}: {key} must be a list of {{\"file\", \"weight\"}}")
        if case.fuse and not case.loras:
            raise UserError(f"{what}: fuse needs loras")
        if case.fused_loras and case.loras:
            raise UserError(f"{what}: give loras or fused_loras, not both")
        return case

    def lora_specs(self, base: pathlib.Path) -> tuple[list[LoraSpec], bool]:
        """The LoRAs diffusers loads for this case and whether it fuses them."""
        items, fuse = (self.fused_loras, True) if self.fused_loras else (self.loras, self.fuse)
        specs = []
        for item in items or []:
            path = pathlib.Path(item["file"]).expanduser()
            path = path if path.is_absolute() else base / path
            specs.append(resolve_lora(LoraSpec(str(path), float(item.get("weight", 1.0)))))
        return specs, fuse and bool(specs)


def _is_lora_item(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("file"), str)
        and set(item) <= {"file", "weight"}
        and isinstance(item.get("weight", 1.0), (int, float))
    )


def load_reference_pipeline(model: str, motion_adapter: str) -> Any:
    from diffusers import TCDScheduler

    from export.animatediff import load_animatediff

    pipe = load_animatediff(model, motion_adapter)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def run_case(pipe: Any, case: VideoCase) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """One call of the pipeline: (final latents, uint8 frames, intermediates)."""
    import torch

    max_frames = pipe.unet.config.motion_max_seq_length
    if case.frames > max_frames:
        raise UserError(f"case {case.name!r}: {case.frames} frames; the adapter takes {max_frames}")
    steps: list[np.ndarray] = []
    timesteps: list[float] = []
    extra: dict[str, np.ndarray] = {}
    frames = case.frames

    def on_step_end(_pipe: Any, _i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        steps.append(_np(kwargs["latents"]))
        timesteps.append(float(t))
        if "prompt_embeds" not in extra:
            extra["prompt_embeds"] = _np(kwargs["prompt_embeds"][::frames])
        return {}

    prepare = pipe.prepare_latents

    def capture(*args: Any, **kwargs: Any) -> Any:
        latents = prepare(*args, **kwargs)
        extra["initial_latents"] = _np(latents)
        return latents

    pipe.prepare_latents = capture
    try:
        out = pipe(
            prompt=case.prompt,
            negative_prompt=case.negative_prompt,
            num_frames=frames,
            height=case.height,
            width=case.width,
            num_inference_steps=case.steps,
            guidance_scale=case.guidance,
            eta=case.eta,
            generator=torch.Generator("cpu").manual_seed(case.seed),
            decode_chunk_size=case.decode_chunk,
            output_type="pil",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        )
    finally:
        del pipe.prepare_latents
    video = np.stack([np.asarray(frame.convert("RGB")) for frame in out.frames[0]])
    extra["timesteps"] = np.asarray(timesteps, dtype=np.float32)
    extra["latents"] = np.stack(steps)
    return steps[-1], video.astype(np.uint8), extra


def run_batch(
    model: str, motion_adapter: str, cases_file: pathlib.Path, out_dir: pathlib.Path
) -> list[str]:
    """Run every case of `cases_file` (a JSON list) into `out_dir`; returns the case names."""
    try:
        raw = json.loads(cases_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--cases {cases_file}: {exc}") from exc
    if not isinstance(raw, list):
        raise UserError(f"--cases {cases_file}: expected a JSON list of cases")
    cases = [VideoCase.from_json(obj, i) for i, obj in enumerate(raw)]
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise UserError(f"--cases {cases_file}: case names must be unique")
    base = cases_file.resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_reference_pipeline(model, motion_adapter)
    for case in cases:
        specs, fuse = case.lora_specs(base)
        adapters = load_loras(pipe, specs)
        if fuse:
            pipe.fuse_lora(components=lora_components(pipe), adapter_names=adapters)
        latents, video, extra = run_case(pipe, case)
        np.save(out_dir / f"{case.name}.npy", latents.astype(np.float32))
        np.save(out_dir / f"{case.name}_frames.npy", video)
        if case.intermediates:
            np.savez(out_dir / f"{case.name}.npz", **extra)
        if fuse:
            pipe = load_reference_pipeline(model, motion_adapter)
        elif adapters:
            pipe.unload_lora_weights()
    return names


def run_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.cases is None or args.out_dir is None:
        parser.error("--motion-adapter runs batch mode only: give --cases and --out-dir")
    run_batch(args.model, args.motion_adapter, args.cases, args.out_dir)
