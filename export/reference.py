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
"""

from __future__ import annotations

import argparse
import json
import pathlib
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from export.convert import UserError


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

    @classmethod
    def from_json(cls, obj: Any, index: int) -> "Case":
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

    def lora_specs(self, base: pathlib.Path) -> list[Any]:
        from export.lora import LoraSpec, resolve_lora

        out = []
        for item in self.loras or []:
            path = pathlib.Path(item["file"]).expanduser()
            path = path if path.is_absolute() else base / path
            out.append(resolve_lora(LoraSpec(str(path), float(item.get("weight", 1.0)))))
        return out


@dataclass
class Result:
    images: list[Any]
    latents: np.ndarray
    intermediates: dict[str, np.ndarray]


def load_reference_pipeline(model: str) -> Any:
    from diffusers import TCDScheduler

    from export.convert import load_pipeline

    pipe = load_pipeline(model)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def apply_loras(pipe: Any, specs: list[Any], fuse: bool) -> None:
    """Load `specs` as adapters with set_adapters weights; fuse them when asked."""
    from export.lora import load_loras, lora_components

    names = load_loras(pipe, specs)
    if fuse and names:
        pipe.fuse_lora(components=lora_components(pipe), adapter_names=names)


def run_case(pipe: Any, case: Case) -> Result:
    import torch

    steps: list[np.ndarray] = []
    extra: dict[str, np.ndarray] = {}
    wanted = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    tensor_inputs = [k for k in wanted if k in getattr(pipe, "_callback_tensor_inputs", [])]

    def on_step_end(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        steps.append(kwargs["latents"].detach().float().cpu().numpy().copy())
        if i == 0:
            for k in tensor_inputs[1:]:
                extra[k] = kwargs[k].detach().float().cpu().numpy().copy()
        return {}

    original_prepare = pipe.prepare_latents

    def prepare_latents(*args: Any, **kwargs: Any) -> Any:
        latents = original_prepare(*args, **kwargs)
        extra["initial_latents"] = latents.detach().float().cpu().numpy().copy()
        return latents

    pipe.prepare_latents = prepare_latents
    try:
        out = pipe(
            prompt=case.prompt,
            negative_prompt=case.negative_prompt,
            num_inference_steps=case.steps,
            guidance_scale=case.guidance,
            eta=case.eta,
            width=case.width,
            height=case.height,
            num_images_per_prompt=case.num_images,
            generator=torch.Generator("cpu").manual_seed(case.seed),
            output_type="pil",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=tensor_inputs,
        )
    except ValueError as exc:  # diffusers' own argument checks (sizes, prompts)
        raise UserError(f"case {case.name!r}: {exc}") from exc
    finally:
        del pipe.prepare_latents
    extra["timesteps"] = pipe.scheduler.timesteps.detach().float().cpu().numpy()
    extra["latents"] = np.stack(steps).astype(np.float32)
    return Result(out.images, steps[-1].astype(np.float32), extra)


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
        run_batch(args.model, cases, args.out_dir, args.cases.parent)
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
    )
    if args.lora:
        case.loras = [_cli_lora(s) for s in args.lora]
    case.fuse = bool(args.fuse_lora)
    case.validate("reference")
    pipe = load_reference_pipeline(args.model)
    apply_loras(pipe, case.lora_specs(pathlib.Path.cwd()), case.fuse)
    result = run_case(pipe, case)
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
    from export.lora import parse_lora_spec

    spec = parse_lora_spec(text)
    path = pathlib.Path(spec.source).expanduser()
    return {"file": str(path.resolve()) if absolute else str(path), "weight": spec.weight}


def run_batch(
    model: str, cases: list[Case], out_dir: pathlib.Path, base: pathlib.Path | None = None
) -> None:
    """Run `cases` on one pipeline; LoRA files in cases are relative to `base` (the cases file's
    directory)."""
    import logging

    log = logging.getLogger("export")
    base = pathlib.Path.cwd() if base is None else base
    specs = [case.lora_specs(base) for case in cases]  # check every file before running any
    pipe = load_reference_pipeline(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    for n, case in enumerate(cases):
        if specs[n]:
            apply_loras(pipe, specs[n], case.fuse)
        try:
            result = run_case(pipe, case)
        finally:
            if specs[n]:
                if case.fuse and n + 1 < len(cases):
                    # unfuse_lora subtracts the delta back, leaving rounding noise in the base
                    # weights; a fresh pipeline keeps the later cases exact.
                    pipe = load_reference_pipeline(model)
                else:
                    pipe.unload_lora_weights()
        result.images[0].save(out_dir / f"{case.name}.png")
        if len(result.images) > 1:
            for i, image in enumerate(result.images):
                image.save(out_dir / f"{case.name}_{i}.png")
        np.save(out_dir / f"{case.name}.npy", result.latents)
        if case.intermediates:
            _write_npz(out_dir / f"{case.name}.npz", result.intermediates)
        log.info("reference %s", case.name)
