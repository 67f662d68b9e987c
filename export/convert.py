"""`python -m export convert`: a diffusers pipeline -> an optimum-compatible ONNX directory.

Layout written (optimum's, plus the `tcd_ort.json` manifest)::

    model_index.json  scheduler/scheduler_config.json  tokenizer/  [tokenizer_2/]
    text_encoder/  [text_encoder_2/]  unet/  vae_decoder/  vae_encoder/  tcd_ort.json

each model directory holding `model.onnx`, `model.onnx_data` and the component's `config.json`.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import time
from collections.abc import Callable
from typing import Any

from export import lora as lora_mod
from export import lora_slots as slots_mod
from export.errors import UserError
from export.manifest import build_manifest, write_manifest
from export.segments import write_unet_segments
from export.sources import load_pipeline
from export.text_encoder import export_text_encoder
from export.unet import export_unet
from export.vae import export_vae_decoder, export_vae_encoder

log = logging.getLogger("export")


def detect_family(pipe: Any) -> str:
    """`sdxl`, `sd21` (SD2.x, base or v-prediction) or `sd15`.

    Real checkpoints are told apart by the text encoder width the UNet attends to: 1024 for
    SD2.x's OpenCLIP ViT-H, 768 for SD1.x's CLIP ViT-L. Other widths (tiny test models, custom
    ones) fall back to the tokenizer: SD2.x's pads with "!" (id 0), SD1.x's with <|endoftext|>.
    That is the trait the engine's conditioning actually depends on, and it travels with the
    model directory, unlike the scheduler's prediction_type (SD2.1-base predicts epsilon, some
    SD1.x fine-tunes predict v).
    """
    if getattr(pipe, "text_encoder_2", None) is not None or "XL" in type(pipe).__name__:
        return "sdxl"
    width = pipe.unet.config.cross_attention_dim
    if width == 1024:
        return "sd21"
    if width == 768:
        return "sd15"
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "pad_token", None) == "!":
        return "sd21"
    return "sd15"


def prediction_type(pipe: Any) -> str:
    value = pipe.scheduler.config.get("prediction_type", "epsilon")
    if value not in ("epsilon", "v_prediction"):
        raise UserError(f"unsupported prediction_type {value!r} in the scheduler config")
    return value


DTYPE_NAMES = {"fp32": "float32", "fp16": "float16"}


def torch_dtype(name: str) -> Any:
    """`fp32` / `fp16` as a torch dtype."""
    import torch

    if name not in DTYPE_NAMES:
        raise UserError(f"unsupported dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return torch.float16 if name == "fp16" else torch.float32


def cast_pipeline(pipe: Any, dtype: Any, vae_dtype: Any) -> None:
    """Cast the text encoder(s) and the UNet to `dtype` and the VAE to `vae_dtype`, in place.

    Parameter names do not change, so the exported initializers keep them.
    """
    for name in ("text_encoder", "text_encoder_2", "unet"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(dtype)
    if getattr(pipe, "vae", None) is not None:
        pipe.vae.to(vae_dtype)


TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


def _save_tokenizer(tokenizer: Any, out: pathlib.Path, source: pathlib.Path | None) -> None:
    from transformers import CLIPTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    if source is not None and source.is_dir():
        # Keep the classic vocab.json / merges.txt pair optimum directories carry.
        for name in TOKENIZER_FILES:
            if (source / name).exists() and not (out / name).exists():
                shutil.copyfile(source / name, out / name)
    if not (out / "tokenizer.json").exists():
        # The engine reads tokenizer.json; convert the slow tokenizer if that is what we have.
        CLIPTokenizerFast.from_pretrained(out).save_pretrained(out)


def convert(
    source: str,
    out_dir: pathlib.Path,
    config: str | None = None,
    opset: int = 18,
    overwrite: bool = False,
    loras: list[Any] | None = None,
    fuse_lora: bool = False,
    lora_slots: int | None = None,
    dtype: str = "fp32",
    vae_dtype: str | None = None,
    attention: str = "fused",
) -> dict[str, Any]:
    """Export every component of `source` into `out_dir`; returns the manifest written.

    `loras` (export.lora.LoraSpec) are fused into the weights with `fuse_lora`, otherwise
    recorded in the manifest for the engine to apply; see export/lora.py. `lora_slots` exports
    the UNet with empty LoRA layers of that rank for unfused LoRAs; see export/lora_slots.py.

    `dtype` (`fp32` or `fp16`) is the dtype of the text encoder(s) and the UNet, weights and
    activations alike (LoRAs are fused in float32 first). The VAE stays float32 unless
    `vae_dtype="fp16"`: most VAEs overflow in float16 (NaNs, black images); only VAEs made for
    it, such as madebyollin/sdxl-vae-fp16-fix, should be exported so.

    `attention`: `"fused"` (ONNX Runtime's MultiHeadAttention in the UNet and the VAE, for
    CPU, CUDA and DirectML) or `"plain"` (standard ONNX ops only, for TensorRT and CoreML); see
    export/attention.py.
    """
    return export_pipeline(
        source,
        out_dir,
        lambda: load_pipeline(source, config),
        opset=opset,
        overwrite=overwrite,
        loras=loras,
        fuse_lora=fuse_lora,
        lora_slots=lora_slots,
        dtype=dtype,
        vae_dtype=vae_dtype,
        attention=attention,
    )


# `unet_exporter(unet, out_dir, opset, pooled_dim, lora_slots, attention)` -> slotted modules.
UnetExporter = Callable[[Any, pathlib.Path, int, int | None, int | None, str], list[str]]


def export_pipeline(
    source: str,
    out_dir: pathlib.Path,
    load: Callable[[], Any],
    opset: int = 18,
    overwrite: bool = False,
    loras: list[Any] | None = None,
    fuse_lora: bool = False,
    lora_slots: int | None = None,
    dtype: str = "fp32",
    vae_dtype: str | None = None,
    attention: str = "fused",
    unet_exporter: UnetExporter = export_unet,
    manifest_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The flow `convert` and `animatediff` share: check the options, `load()` the pipeline
    (the caller's loader, which raises UserError for inputs it refuses), fuse or check the
    LoRAs on it, then write the model directory: configs, tokenizer(s), text encoder(s), the
    UNet through `unet_exporter` (export/unet.py's `export_unet` for image UNets) and its
    low-memory segments, the VAE halves and the manifest, with `manifest_extra`'s top-level
    keys added. See `convert` for the options.

    `out_dir` is refused before loading when it is not empty and `overwrite` is false, and
    replaced only once the pipeline has loaded, so a source that fails to load leaves it as
    it was.
    """
    out_dir = pathlib.Path(out_dir)
    if lora_slots is not None:
        slots_mod.check_rank(lora_slots)
    model_dtype = torch_dtype(dtype)
    vae_torch_dtype = torch_dtype(vae_dtype or "fp32")
    if lora_slots is not None and dtype != "fp32":
        raise UserError("--lora-slots works with --dtype fp32 only for now")
    if vae_dtype == "fp16":
        log.warning(
            "exporting the VAE in float16: most VAEs overflow in float16 and decode NaNs "
            "(black images); use this only for a VAE made for it (e.g. "
            "madebyollin/sdxl-vae-fp16-fix)"
        )
    specs = [lora_mod.resolve_lora(s) for s in loras or []]
    if fuse_lora and not specs:
        raise UserError("--fuse-lora needs at least one --lora")
    replace = out_dir.exists() and any(out_dir.iterdir())
    if replace and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    t0 = time.perf_counter()
    pipe = load()
    family = detect_family(pipe)
    pred = prediction_type(pipe)
    log.info("loaded %s (%s, %s) in %.1fs", source, family, pred, time.perf_counter() - t0)
    if fuse_lora:
        lora_mod.fuse_loras(pipe, specs)
        log.info("fused %d LoRA(s) into the weights", len(specs))
    else:
        lora_mod.check_loras_fit(pipe, specs)
    cast_pipeline(pipe, model_dtype, vae_torch_dtype)
    if replace:
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    pipe.save_config(out_dir)  # model_index.json, unchanged as optimum does
    pipe.scheduler.save_pretrained(out_dir / "scheduler")
    local = pathlib.Path(source).expanduser()
    local_dir = local if local.is_dir() else None
    sdxl = family == "sdxl"
    for name in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        src = local_dir / name if local_dir is not None else None
        _save_tokenizer(getattr(pipe, name), out_dir / name, src)

    steps = [("text_encoder", lambda d: export_text_encoder(pipe.text_encoder, d, opset, sdxl))]
    pooled_dim = None
    if sdxl:
        te2 = pipe.text_encoder_2
        pooled_dim = te2.config.projection_dim
        steps.append(("text_encoder_2", lambda d: export_text_encoder(te2, d, opset, True)))
    slots: dict[str, Any] = {}

    def unet_step(d: pathlib.Path) -> None:
        slotted = unet_exporter(pipe.unet, d, opset, pooled_dim, lora_slots, attention)
        write_unet_segments(d)
        if lora_slots is not None:
            slots["unet"] = slots_mod.manifest_entry(lora_slots, slotted)
            log.info("unet: LoRA slots of rank %d on %d modules", lora_slots, len(slotted))

    steps += [
        ("unet", unet_step),
        ("vae_decoder", lambda d: export_vae_decoder(pipe.vae, d, opset, attention)),
        ("vae_encoder", lambda d: export_vae_encoder(pipe.vae, d, opset, attention)),
    ]
    for name, step in steps:
        t = time.perf_counter()
        step(out_dir / name)
        log.info("exported %s in %.1fs", name, time.perf_counter() - t)

    entries = [s.manifest_entry() for s in specs]
    manifest = build_manifest(
        out_dir,
        family,
        pred,
        opset,
        lora=[] if fuse_lora else entries,
        fused_lora=entries if fuse_lora else [],
        lora_slots=slots,
        dtype=DTYPE_NAMES[dtype],
    )
    manifest.update(manifest_extra or {})
    write_manifest(out_dir, manifest)
    log.info("wrote %s in %.1fs", out_dir, time.perf_counter() - t0)
    return manifest
