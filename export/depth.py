"""The depth estimator of depth ControlNets: a transformers `DPTForDepthEstimation`
(``Intel/dpt-hybrid-midas`` in diffusers' ControlNet-depth guide) exported to the flat directory
the engine's `control::depth::DepthEstimator` reads:

    model.onnx, model.onnx_data   input `pixel_values` f32 [batch, 3, height, width],
                                  output `predicted_depth` f32 [batch, height, width]
    config.json                   the DPTConfig
    preprocessor_config.json      the image processor's settings (size, resample, mean/std ...)
    tcd_ort.json                  {"kind": "depth-estimator", "components": {"depth_estimator"}}

The batch is dynamic; height and width are fixed to the image processor's `size`, which every
image becomes when the processor neither keeps the aspect ratio nor skips the resize (true of
dpt-hybrid-midas). Tracing the hybrid backbone (BiT with "same" dynamic padding) with symbolic
height and width kept torch.export in sympy for more than ten minutes on the tiny model, and a
hybrid DPT refuses other sizes anyway unless its embeddings are told to interpolate the position
embeddings. Processors that make sizes vary per image are refused with an explanation.

`build_tiny_depth` writes a random-weight hybrid DPT shaped like transformers' own hybrid DPT
test (`tests/models/dpt/test_modeling_dpt_hybrid.py`) with dpt-hybrid-midas's preprocessing,
for the tests.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import time
from typing import Any

import torch

from export.errors import UserError
from export.layout import MANIFEST_FILE, ONNX_FILE
from export.manifest import FORMAT_VERSION, exporter_info
from export.onnx_io import Io, describe_io, export_component
from export.sources import looks_like_hub_id

log = logging.getLogger("export")

KIND = "depth-estimator"
COMPONENT = "depth_estimator"
INPUT = "pixel_values"
OUTPUT = "predicted_depth"

# Intel/dpt-hybrid-midas's preprocessor_config.json (the values every Intel DPT checkpoint
# ships): a plain 384x384 resize, PIL resample 2 (BILINEAR, although DPTImageProcessor's class
# default is BICUBIC), rescale 1/255, normalise with mean = std = 0.5.
DPT_HYBRID_MIDAS_PREPROCESSOR: dict[str, Any] = {
    "do_resize": True,
    "size": {"height": 384, "width": 384},
    "keep_aspect_ratio": False,
    "ensure_multiple_of": 1,
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_pad": False,
}

# The tiny model's input side: 64x64 instead of 384x384, so a test runs in milliseconds; every
# other preprocessing setting is dpt-hybrid-midas's.
TINY_IMAGE_SIZE = 64


class _DepthWrapper(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=False)[0]


def fixed_input_size(processor: Any) -> tuple[int, int]:
    """(height, width) of every `pixel_values` the processor makes, or a UserError."""
    size = getattr(processor, "size", None) or {}
    height, width = size.get("height"), size.get("width")
    if not getattr(processor, "do_resize", True) or height is None or width is None:
        raise UserError(
            "the image processor does not resize every image to one size (do_resize is off or "
            f"size is {size!r}); tcd-ort exports depth estimators at a fixed input size"
        )
    if getattr(processor, "keep_aspect_ratio", False):
        raise UserError(
            "the image processor keeps the aspect ratio (keep_aspect_ratio=true), so input sizes "
            "vary per image; tcd-ort exports depth estimators at a fixed input size"
        )
    multiple = getattr(processor, "ensure_multiple_of", 1) or 1
    if height % multiple or width % multiple:
        raise UserError(f"size {height}x{width} is not a multiple of ensure_multiple_of={multiple}")
    return int(height), int(width)


def image_processor_class() -> type:
    """The PIL image processor: transformers 5 names it `DPTImageProcessorPil`; its
    `DPTImageProcessor` is the torchvision one when torchvision is installed (PIL otherwise).
    diffusers' guide was written when `DPTImageProcessor` was the PIL one, and the engine
    reproduces PIL's resize, so the PIL class is the reference."""
    try:
        from transformers import DPTImageProcessorPil

        return DPTImageProcessorPil
    except ImportError:  # transformers 4: DPTImageProcessor is the PIL one
        from transformers import DPTImageProcessor

        return DPTImageProcessor


def load_depth_model(source: str) -> tuple[Any, Any]:
    """`DPTForDepthEstimation` and its image processor from a local dir or a hub id."""
    from transformers import DPTForDepthEstimation

    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{source}: no config.json; expected a DPTForDepthEstimation directory")
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type != "dpt":
            raise UserError(
                f"{source}: config.json has model_type {model_type!r}, expected 'dpt' "
                "(a transformers DPTForDepthEstimation such as Intel/dpt-hybrid-midas)"
            )
        src: str | pathlib.Path = path
    elif looks_like_hub_id(source):
        src = source
    else:
        raise UserError(f"{source}: no such directory (and not a hub id like 'owner/name')")
    model = DPTForDepthEstimation.from_pretrained(src, dtype=torch.float32).eval()
    processor = image_processor_class().from_pretrained(src)
    return model, processor


def export_depth_model(
    model: torch.nn.Module, processor: Any, out_dir: pathlib.Path, opset: int = 18
) -> dict[str, Any]:
    """Write the graph, configs and manifest into `out_dir`; returns the manifest."""
    h, w = fixed_input_size(processor)
    # Batch 2, so the exporter cannot fold the batch in.
    sample = torch.rand(2, 3, h, w) * 2 - 1
    export_component(
        _DepthWrapper(model),
        (sample,),
        [Io(INPUT, {0: "batch"})],
        [Io(OUTPUT, {0: "batch"})],
        out_dir,
        opset,
        prefix="model.",
    )
    model.config.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "dtype": "float32",
        "weights_keep_names": True,
        "exporter": exporter_info(opset),
        "components": {COMPONENT: describe_io(out_dir / ONNX_FILE)},
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def verify(model: torch.nn.Module, out_dir: pathlib.Path, pixel_values: torch.Tensor) -> float:
    """Largest |onnxruntime - torch| of `predicted_depth`, relative to torch's largest value."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    session = ort.InferenceSession(
        str(out_dir / ONNX_FILE), opts, providers=["CPUExecutionProvider"]
    )
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).predicted_depth.numpy()
    (actual,) = session.run([OUTPUT], {INPUT: pixel_values.numpy()})
    scale = max(float(abs(expected).max()), 1e-12)
    return float(abs(actual - expected).max()) / scale


def convert_depth(
    source: str, out_dir: pathlib.Path, opset: int = 18, overwrite: bool = False
) -> dict[str, Any]:
    """`python -m export depth SOURCE OUT_DIR`: export and check onnxruntime against torch."""
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out_dir)
    t0 = time.perf_counter()
    model, processor = load_depth_model(source)
    log.info("loaded %s in %.1fs", source, time.perf_counter() - t0)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = export_depth_model(model, processor, out_dir, opset)
    h, w = fixed_input_size(processor)
    torch.manual_seed(0)
    pixel_values = torch.rand(1, 3, h, w) * 2 - 1
    diff = verify(model, out_dir, pixel_values)
    log.info("onnxruntime vs torch: max |diff| %.2e of the largest depth", diff)
    if not diff < 1e-3:
        raise UserError(
            f"the exported graph disagrees with torch (max relative difference {diff:.2e}); "
            "this is an exporter bug, please report it"
        )
    log.info("wrote %s in %.1fs", out_dir, time.perf_counter() - t0)
    return manifest


def tiny_config(seed: int = 0) -> Any:
    """transformers' hybrid DPT test configuration (BiT backbone, `is_hybrid=True`) at
    `TINY_IMAGE_SIZE`, with dpt-hybrid-midas's depth-head settings."""
    from transformers import DPTConfig

    del seed  # the config has no randomness; kept for symmetry with build_tiny_depth
    backbone_config = {
        "global_padding": "same",
        "layer_type": "bottleneck",
        "depths": [3, 4, 9],
        "out_features": ["stage1", "stage2", "stage3"],
        "embedding_dynamic_padding": True,
        "hidden_sizes": [16, 16, 32, 32],
        "num_groups": 2,
    }
    return DPTConfig(
        image_size=TINY_IMAGE_SIZE,
        patch_size=16,
        num_channels=3,
        hidden_size=32,
        fusion_hidden_size=32,
        num_hidden_layers=4,
        backbone_out_indices=[0, 1, 2, 3],
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act="gelu",
        is_hybrid=True,
        backbone_config=backbone_config,
        backbone=None,
        backbone_featmap_shape=[1, 32, 24, 24],
        neck_hidden_sizes=[16, 16, 32, 32],
        # dpt-hybrid-midas's readout and head.
        readout_type="project",
        head_in_index=-1,
    )


def build_tiny_depth(out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A random-weight `DPTForDepthEstimation` (hybrid) and its PIL image processor, written with
    `save_pretrained`: a stand-in for Intel/dpt-hybrid-midas that `convert_depth` reads."""
    from transformers import DPTForDepthEstimation

    torch.manual_seed(seed)
    model = DPTForDepthEstimation(tiny_config(seed)).eval()
    # The default initialisation gives a nearly constant depth; spread every parameter so the
    # map has structure, and lift the last convolution's bias so the head's final ReLU (depth
    # is non-negative) does not zero it: that keeps values around 0.6 to 0.9, varying by ~20%.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.head.head[4].bias.add_(1.0)
    settings = dict(DPT_HYBRID_MIDAS_PREPROCESSOR)
    settings["size"] = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    processor = image_processor_class()(**settings)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
