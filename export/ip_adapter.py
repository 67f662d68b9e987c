"""`python -m export ip-adapter`: an IP-Adapter (h94/IP-Adapter layout) -> the directory the
engine's IP-Adapter pipeline reads (issue #20).

Source layout, as diffusers' `load_ip_adapter(SOURCE, subfolder, weight_name)` reads it::

    SOURCE/<subfolder>/<weight-name>          .safetensors (keys `image_proj.*`, `ip_adapter.*`)
                                              or .bin (torch.load: {"image_proj": {...},
                                              "ip_adapter": {...}})
    SOURCE/<subfolder>/image_encoder/         CLIPVisionModelWithProjection (save_pretrained)

Layout written::

    OUT_DIR/tcd_ort.json
    OUT_DIR/image_encoder/model.onnx  model.onnx_data  config.json  preprocessor_config.json
    OUT_DIR/image_projection/model.onnx  model.onnx_data

`image_encoder`: `pixel_values` f32 [batch, 3, S, S] (S = the vision config's `image_size`, 224
for real encoders) to `image_embeds` f32 [batch, projection_dim] for plain adapters, or
`image_hidden_states` f32 [batch, patches + 1, hidden] = `hidden_states[-2]` for plus adapters:
what diffusers' `encode_image` feeds each kind. `preprocessor_config.json` is the source's when
one lies beside the encoder, else `CLIPImageProcessor(size=S, crop_size=S)`, the processor
`load_ip_adapter` registers (at S = 224 these are CLIPImageProcessor's own defaults).

`image_projection`: the adapter's image projection, as diffusers'
`UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers` builds it
(`ImageProjection` for plain adapters, the `IPAdapterPlusImageProjection` Resampler for plus),
followed by every cross-attention layer's `to_k_ip` / `to_v_ip`: input the encoder's output
(same name and shape), outputs `ip_key_0`, `ip_value_0`, ..., `ip_key_{L-1}`, `ip_value_{L-1}`,
f32 [batch, tokens, h_i]. Layer i is the weights file's `ip_adapter.{2i+1}.to_k_ip.weight` /
`.to_v_ip.weight`: diffusers' `key_id` numbering, 1, 3, 5, ... over the UNet's attn2 layers in
`unet.attn_processors` order, whose hidden size h_i is the weight's first dimension. The
initializers keep the source's names for those (`ip_adapter.1.to_k_ip.weight`) and diffusers'
names under `image_proj.` for the projection (`image_proj.image_embeds.weight`,
`image_proj.layers.0.attn.to_q.weight`). Running the projection once per generation and
feeding the keys and values to the UNet is exact: they do not depend on the timestep.

Unconditional embeddings (guidance > 1), as diffusers makes them: plain adapters project zeros
shaped like `image_embeds`; plus adapters encode an all-zero `pixel_values`.

`tcd_ort.json`: `{"format_version": 1, "kind": "ip-adapter", "variant": "plain" | "plus",
"family", "dtype": "float32", "weights_keep_names": true, "cross_attention_dim", "tokens",
"layers": [h_0, ...], "image_encoder_output", "exporter", "components"}`; the family is `sd15`,
`sd21` or `sdxl` by the cross-attention width (768, 1024, 2048), `sd` otherwise.

Full-face, FaceID and FaceID Plus adapters (other image projections, and LoRAs in the UNet for
FaceID) are refused. `build_tiny_ip_adapter` writes random-weight adapters of both kinds for a
tiny pipeline, in the original key layout, for the tests.
"""

from __future__ import annotations

import logging
import pathlib
import re
import shutil
import time
import types
from dataclasses import dataclass
from typing import Any

import torch

from export.errors import UserError
from export.layout import ONNX_FILE
from export.manifest import build_ip_adapter_manifest, write_manifest
from export.onnx_io import Io, export_component
from export.sources import looks_like_hub_id

log = logging.getLogger("export")

VARIANTS = ("plain", "plus")
DEFAULT_SUBFOLDER = "models"
DEFAULT_WEIGHT_NAME = "ip-adapter_sd15.safetensors"
# diffusers' `image_encoder_folder` default: a folder name inside `subfolder`.
DEFAULT_IMAGE_ENCODER_FOLDER = "image_encoder"
ENCODER = "image_encoder"
PROJECTION = "image_projection"
PIXEL_VALUES = "pixel_values"
ENCODER_OUTPUT = {"plain": "image_embeds", "plus": "image_hidden_states"}
KEY_OUTPUT = "ip_key_{}"
VALUE_OUTPUT = "ip_value_{}"
FAMILIES = {768: "sd15", 1024: "sd21", 2048: "sdxl"}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# The Resampler depth `_convert_ip_adapter_image_proj_to_diffusers` builds (its class default)
# and the head width it assumes when it reads the head count off `to_q`.
PLUS_DEPTH = 4
PLUS_DIM_HEAD = 64
_IP_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")

@dataclass
class AdapterWeights:
    """An IP-Adapter's state dict split as `load_ip_adapter` splits it, keys without the
    `image_proj.` / `ip_adapter.` prefix."""

    image_proj: dict[str, torch.Tensor]
    ip_adapter: dict[str, torch.Tensor]


@dataclass
class AdapterSource:
    """Where an IP-Adapter's files are on this machine."""

    weights: pathlib.Path
    image_encoder: pathlib.Path


def image_processor_class() -> type:
    """The PIL CLIP image processor (transformers 5 names it `CLIPImageProcessorPil`; its
    `CLIPImageProcessor` is the torchvision one when torchvision is installed): the engine
    reproduces PIL's resize."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def family_of(cross_attention_dim: int) -> str:
    return FAMILIES.get(cross_attention_dim, "sd")


def _split_prefixed(tensors: dict[str, torch.Tensor]) -> AdapterWeights:
    image_proj, ip_adapter = {}, {}
    for key, value in tensors.items():
        if key.startswith("image_proj."):
            image_proj[key.removeprefix("image_proj.")] = value
        elif key.startswith("ip_adapter."):
            ip_adapter[key.removeprefix("ip_adapter.")] = value
    return AdapterWeights(image_proj, ip_adapter)


def read_weights(path: pathlib.Path) -> AdapterWeights:
    """The `image_proj` and `ip_adapter` parts of an IP-Adapter weights file, as diffusers'
    `load_ip_adapter` reads them: prefixed keys in .safetensors, a nested dict in .bin (loaded
    with `torch.load(weights_only=True)`; a flat dict with prefixed keys is taken too)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                weights = _split_prefixed({k: f.get_tensor(k) for k in f.keys()})
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{path}: not a readable .safetensors file ({exc})") from None
    elif path.suffix == ".bin":
        import pickle

        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: not a loadable torch state dict ({first})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
        if isinstance(loaded.get("image_proj"), dict) or isinstance(loaded.get("ip_adapter"), dict):
            weights = AdapterWeights(
                dict(loaded.get("image_proj") or {}), dict(loaded.get("ip_adapter") or {})
            )
        else:
            weights = _split_prefixed(loaded)
    else:
        raise UserError(
            f"{path}: IP-Adapter weights must be {' or '.join(WEIGHT_SUFFIXES)} (diffusers' "
            "load_ip_adapter formats)"
        )
    for part in (weights.image_proj, weights.ip_adapter):
        for key, value in part.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise UserError(f"{path}: {key} is not a floating-point tensor")
    if not weights.image_proj or not weights.ip_adapter:
        missing = " and ".join(
            n
            for n, d in (("image_proj", weights.image_proj), ("ip_adapter", weights.ip_adapter))
            if not d
        )
        raise UserError(
            f"{path}: no {missing} weights (expected keys image_proj.* and ip_adapter.*); is it "
            "an IP-Adapter?"
        )
    return weights


def adapter_variant(image_proj: dict[str, torch.Tensor]) -> str:
    """`"plain"` or `"plus"`, told apart by the keys diffusers' converter looks at, in its
    order; other kinds are a UserError naming them."""
    if "proj.weight" in image_proj:
        return "plain"
    unsupported = (
        ("proj.3.weight", "IP-Adapter Full Face (ip-adapter-full-face)"),
        ("perceiver_resampler.proj_in.weight", "IP-Adapter FaceID Plus (ip-adapter-faceid-plus*)"),
        ("norm.weight", "IP-Adapter FaceID (ip-adapter-faceid*)"),
    )
    for key, name in unsupported:
        if key in image_proj:
            raise UserError(
                f"{name} is not supported; tcd-ort exports plain IP-Adapters (ImageProjection) "
                "and IP-Adapter Plus (Resampler) ones"
            )
    if "latents" in image_proj:
        return "plus"
    shown = ", ".join(sorted(image_proj)[:4])
    raise UserError(
        f"unknown IP-Adapter image projection (keys {shown}, ...); tcd-ort exports plain "
        "IP-Adapters (image_proj.proj.weight) and IP-Adapter Plus (image_proj.latents)"
    )


def image_projection_module(image_proj: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The image projection diffusers' `load_ip_adapter` builds from `image_proj`: its own
    `_convert_ip_adapter_image_proj_to_diffusers`, which reads nothing of the UNet when it
    builds the module on the CPU in full precision."""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    variant = adapter_variant(image_proj)
    if variant == "plus":
        depth = {m.group(1) for k in image_proj if (m := re.match(r"^layers\.(\d+)\.", k))}
        if depth != {str(i) for i in range(PLUS_DEPTH)}:
            raise UserError(
                f"IP-Adapter Plus Resampler with {len(depth)} layers; diffusers' converter (and "
                f"so tcd-ort) builds the {PLUS_DEPTH}-layer one h94's adapters use"
            )
    convert = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers
    tensors = {k: v.to(torch.float32) for k, v in image_proj.items()}
    try:
        module = convert(types.SimpleNamespace(), tensors, low_cpu_mem_usage=False)
    except (KeyError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"diffusers could not build the {variant} image projection: {first}"
        ) from None
    return module.eval()


def ip_layers(ip_adapter: dict[str, torch.Tensor]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """`(key_id, to_k_ip weight, to_v_ip weight)` per cross-attention layer, in UNet order:
    key_id 1, 3, 5, ..., as diffusers numbers the attn2 processors."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    other = []
    for key, value in ip_adapter.items():
        m = _IP_KEY.match(key)
        if m is None:
            other.append(key)
            continue
        found.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if other:
        shown = ", ".join(sorted(other)[:3])
        raise UserError(
            f"ip_adapter weights other than to_k_ip / to_v_ip ({shown}); LoRA layers in the UNet "
            "(FaceID adapters) are not supported"
        )
    ids = sorted(found)
    expected = list(range(1, 2 * len(ids), 2))
    if ids != expected:
        raise UserError(
            f"ip_adapter layer ids {ids[:6]}{' ...' if len(ids) > 6 else ''}; diffusers numbers "
            "the cross-attention layers 1, 3, 5, ... with no gaps"
        )
    layers = []
    for key_id in ids:
        kv = found[key_id]
        if set(kv) != {"k", "v"}:
            half = "to_v_ip" if "k" in kv else "to_k_ip"
            raise UserError(f"ip_adapter layer {key_id} has no {half}.weight")
        if kv["k"].ndim != 2 or kv["k"].shape != kv["v"].shape:
            raise UserError(
                f"ip_adapter layer {key_id}: to_k_ip {tuple(kv['k'].shape)} and to_v_ip "
                f"{tuple(kv['v'].shape)} are not two [hidden, cross_attention_dim] matrices"
            )
        layers.append((key_id, kv["k"].to(torch.float32), kv["v"].to(torch.float32)))
    widths = {k.shape[1] for _, k, _ in layers}
    if len(widths) != 1:
        raise UserError(f"ip_adapter layers take different widths {sorted(widths)}")
    return layers


class _KeyValue(torch.nn.Module):
    """One cross-attention layer's image key and value projections."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor) -> None:
        super().__init__()
        hidden, width = key.shape
        self.to_k_ip = torch.nn.Linear(width, hidden, bias=False)
        self.to_v_ip = torch.nn.Linear(width, hidden, bias=False)
        with torch.no_grad():
            self.to_k_ip.weight.copy_(key)
            self.to_v_ip.weight.copy_(value)


class ImageProjectionGraph(torch.nn.Module):
    """The `image_projection` graph: the image projection, then every layer's keys and values.

    Its attributes are named so the parameters read `image_proj.<diffusers name>` and
    `ip_adapter.<key_id>.to_k_ip.weight`, the weights file's own names for the latter."""

    def __init__(
        self,
        image_proj: torch.nn.Module,
        layers: list[tuple[int, torch.Tensor, torch.Tensor]],
    ) -> None:
        super().__init__()
        self.image_proj = image_proj
        self.ip_adapter = torch.nn.ModuleDict({str(i): _KeyValue(k, v) for i, k, v in layers})

    # One variadic parameter: the graph input is named after the encoder output, which differs
    # by variant, and export_component names inputs after forward's parameters.
    def forward(self, *encoder_output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tokens = self.image_proj(encoder_output[0])
        out: list[torch.Tensor] = []
        for layer in self.ip_adapter.values():
            out += [layer.to_k_ip(tokens), layer.to_v_ip(tokens)]
        return tuple(out)


class ImageEncoderGraph(torch.nn.Module):
    """The `image_encoder` graph: what diffusers' `encode_image` takes from the encoder."""

    def __init__(self, model: torch.nn.Module, variant: str) -> None:
        super().__init__()
        self.model = model
        self.variant = variant

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.variant == "plus":
            return self.model(pixel_values, output_hidden_states=True).hidden_states[-2]
        return self.model(pixel_values).image_embeds


def resolve_source(
    source: str, subfolder: str, weight_name: str, image_encoder_folder: str
) -> AdapterSource:
    """The weights file and the image encoder directory of `source` (a local directory laid
    out like h94/IP-Adapter, or a hub id whose two parts are fetched), checked to exist.

    `image_encoder_folder` follows diffusers: a bare folder name lies inside `subfolder`, a
    path with a `/` is relative to the source's root."""
    if image_encoder_folder.count("/") == 0:
        encoder_rel = pathlib.PurePosixPath(subfolder, image_encoder_folder)
    else:
        encoder_rel = pathlib.PurePosixPath(image_encoder_folder)
    weights_rel = pathlib.PurePosixPath(subfolder, weight_name)
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        root = path
    elif path.exists():
        raise UserError(
            f"{source}: expected a directory laid out like h94/IP-Adapter "
            f"(<subfolder>/<weight-name> and <subfolder>/image_encoder/), or a hub id"
        )
    elif looks_like_hub_id(source):
        root = _download(source, weights_rel, encoder_rel)
    else:
        raise UserError(f"{source}: no such directory (and not a hub id like 'owner/name')")
    weights = root / weights_rel
    if not weights.is_file():
        there = weights.parent
        found = (
            sorted(p.name for p in there.glob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
            if there.is_dir()
            else []
        )
        hint = f"; weights there: {', '.join(found)}" if found else ""
        raise UserError(
            f"{source}: no IP-Adapter weights at {weights} (--subfolder {subfolder!r}, "
            f"--weight-name {weight_name!r}){hint}"
        )
    encoder = root / encoder_rel
    if not (encoder / "config.json").is_file():
        raise UserError(
            f"{source}: no CLIP image encoder at {encoder} (looked for config.json there); an "
            "IP-Adapter source has one in <subfolder>/image_encoder/ as h94/IP-Adapter does, or "
            "pass --image-encoder-folder"
        )
    return AdapterSource(weights, encoder)


def _download(
    repo: str, weights: pathlib.PurePosixPath, encoder: pathlib.PurePosixPath
) -> pathlib.Path:
    """The hub repo's weights file and image encoder (safetensors only when it has them)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    patterns = [str(weights), f"{encoder}/*.json", f"{encoder}/*.safetensors"]
    try:
        root = pathlib.Path(snapshot_download(repo, allow_patterns=patterns))
        if not any((root / str(encoder)).glob("*.safetensors")):
            root = pathlib.Path(snapshot_download(repo, allow_patterns=[f"{encoder}/*.bin"]))
    except (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    ) as exc:
        raise UserError(
            f"{repo}: could not fetch it from the hub ({type(exc).__name__}); pass a local "
            "directory laid out like h94/IP-Adapter"
        ) from None
    return root


def load_image_encoder(path: pathlib.Path) -> Any:
    """The `CLIPVisionModelWithProjection` saved in `path`, float32 on the CPU."""
    import json

    from transformers import CLIPVisionModelWithProjection

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path / 'config.json'}: not valid JSON ({exc})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "clip_vision_model":
        raise UserError(
            f"{path}: config.json has model_type {model_type!r}; IP-Adapters use a CLIP vision "
            "encoder (CLIPVisionModelWithProjection, model_type 'clip_vision_model')"
        )
    return CLIPVisionModelWithProjection.from_pretrained(path, dtype=torch.float32).eval()


def load_image_processor(encoder_dir: pathlib.Path, image_size: int) -> Any:
    """The source's CLIP image processor when it has one beside the encoder, else the one
    diffusers' `load_ip_adapter` makes: `CLIPImageProcessor(size=S, crop_size=S)`; refused
    unless every image it makes is S x S (the graph's fixed size)."""
    cls = image_processor_class()
    if (encoder_dir / "preprocessor_config.json").is_file():
        processor = cls.from_pretrained(encoder_dir)
    else:
        processor = cls(size=image_size, crop_size=image_size)
    crop = getattr(processor, "crop_size", None)
    # A dict in transformers 4, a SizeDict (attributes and .get) in transformers 5.
    crop_hw = (crop.get("height"), crop.get("width")) if crop is not None else (None, None)
    if not getattr(processor, "do_center_crop", False) or crop_hw != (image_size, image_size):
        raise UserError(
            f"{encoder_dir}: the image processor must center-crop every image to the encoder's "
            f"{image_size}x{image_size} (do_center_crop {processor.do_center_crop}, crop_size "
            f"{crop_hw[0]}x{crop_hw[1]})"
        )
    return processor


def _check_out_dir(out_dir: pathlib.Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")


def _check_encoder_fits(encoder: Any, projection: torch.nn.Module, variant: str) -> int:
    """The width the projection takes from the encoder, checked against the encoder's."""
    cfg = encoder.config
    if variant == "plain":
        takes, gives, what = projection.image_embeds.in_features, cfg.projection_dim, "image_embeds"
    else:
        takes, gives, what = projection.proj_in.in_features, cfg.hidden_size, "hidden states"
    if takes != gives:
        raise UserError(
            f"the image projection takes {takes}-wide {what} but the image encoder gives "
            f"{gives}; pair the weights with the encoder they were trained with "
            "(--image-encoder-folder, e.g. models/image_encoder for h94's *_vit-h SDXL adapters)"
        )
    return takes


def export_ip_adapter(
    source: str,
    out_dir: pathlib.Path,
    subfolder: str = DEFAULT_SUBFOLDER,
    weight_name: str = DEFAULT_WEIGHT_NAME,
    opset: int = 18,
    overwrite: bool = False,
    attention: str = "fused",
    image_encoder_folder: str = DEFAULT_IMAGE_ENCODER_FOLDER,
) -> dict[str, Any]:
    """Export the IP-Adapter `source` into `out_dir` (layout in the module docstring); returns
    the manifest. Both graphs are checked against torch before it returns."""
    out_dir = pathlib.Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    t0 = time.perf_counter()
    found = resolve_source(source, subfolder, weight_name, image_encoder_folder)
    weights = read_weights(found.weights)
    variant = adapter_variant(weights.image_proj)
    layers = ip_layers(weights.ip_adapter)
    projection = image_projection_module(weights.image_proj)
    encoder = load_image_encoder(found.image_encoder)
    _check_encoder_fits(encoder, projection, variant)
    size = int(encoder.config.image_size)
    processor = load_image_processor(found.image_encoder, size)
    with torch.no_grad():
        probe = projection(_encoder_example(encoder, variant, 1))
    tokens, cross_attention_dim = int(probe.shape[1]), int(probe.shape[2])
    if layers[0][1].shape[1] != cross_attention_dim:
        raise UserError(
            f"the image projection makes {cross_attention_dim}-wide tokens but to_k_ip takes "
            f"{layers[0][1].shape[1]}; the weights file is inconsistent"
        )
    log.info(
        "loaded %s (%s IP-Adapter, %d layers, %d tokens) in %.1fs",
        found.weights,
        variant,
        len(layers),
        tokens,
        time.perf_counter() - t0,
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    encoder_output = ENCODER_OUTPUT[variant]
    pixel_values = torch.rand(2, 3, size, size) * 2 - 1
    export_component(
        ImageEncoderGraph(encoder, variant),
        (pixel_values,),
        [Io(PIXEL_VALUES, {0: "batch"})],
        [Io(encoder_output, {0: "batch"})],
        out_dir / ENCODER,
        opset,
        prefix="model.",
        attention=attention,
    )
    encoder.config.save_pretrained(out_dir / ENCODER)
    processor.save_pretrained(out_dir / ENCODER)
    graph = ImageProjectionGraph(projection, layers).eval()
    outputs = []
    for i in range(len(layers)):
        outputs += [
            Io(KEY_OUTPUT.format(i), {0: "batch"}),
            Io(VALUE_OUTPUT.format(i), {0: "batch"}),
        ]
    export_component(
        graph,
        (_encoder_example(encoder, variant, 2),),
        [Io(encoder_output, {0: "batch"})],
        outputs,
        out_dir / PROJECTION,
        opset,
        prefix="",
        attention=attention,
    )
    manifest = build_ip_adapter_manifest(
        out_dir,
        variant=variant,
        family=family_of(cross_attention_dim),
        cross_attention_dim=cross_attention_dim,
        tokens=tokens,
        layers=[int(k.shape[0]) for _, k, _ in layers],
        image_encoder_output=encoder_output,
        opset=opset,
    )
    write_manifest(out_dir, manifest)
    diff = verify(encoder, graph, variant, out_dir)
    log.info("onnxruntime vs torch: max |diff| %.2e of the largest value", diff)
    if not diff < 1e-3:
        raise UserError(
            f"the exported graphs disagree with torch (max relative difference {diff:.2e}); "
            "this is an exporter bug, please report it"
        )
    log.info("wrote %s in %.1fs", out_dir, time.perf_counter() - t0)
    return manifest


def _encoder_example(encoder: Any, variant: str, batch: int) -> torch.Tensor:
    """A random tensor shaped like the encoder's output for `variant`."""
    cfg = encoder.config
    if variant == "plain":
        return torch.randn(batch, cfg.projection_dim)
    patches = (cfg.image_size // cfg.patch_size) ** 2
    return torch.randn(batch, patches + 1, cfg.hidden_size)


def verify(encoder: Any, graph: torch.nn.Module, variant: str, out_dir: pathlib.Path) -> float:
    """Largest |onnxruntime - torch| over both graphs' outputs at batch 2, relative to each
    output's largest torch value."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3

    def session(name: str) -> Any:
        path = out_dir / name / ONNX_FILE
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    size = encoder.config.image_size
    pixel_values = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    wrapper = ImageEncoderGraph(encoder, variant)
    with torch.no_grad():
        features = wrapper(pixel_values)
        expected = [features, *graph(features)]
    (encoded,) = session(ENCODER).run(None, {PIXEL_VALUES: pixel_values.numpy()})
    projected = session(PROJECTION).run(None, {ENCODER_OUTPUT[variant]: features.numpy()})
    worst = 0.0
    for actual, want in zip([encoded, *projected], expected, strict=True):
        scale = max(float(want.abs().max()), 1e-12)
        worst = max(worst, float(abs(actual - want.numpy()).max()) / scale)
    return worst
