"""`python -m export depth`: the directory the engine's DepthEstimator reads, and the graph
against transformers' DPTForDepthEstimation."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from export.cli import main
from export.depth import (
    DPT_HYBRID_MIDAS_PREPROCESSOR,
    TINY_IMAGE_SIZE,
    build_tiny_depth,
    convert_depth,
    fixed_input_size,
    image_processor_class,
)
from export.errors import UserError
from export.onnx_io import initializer_names


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("depth")
    src = build_tiny_depth(root / "source", seed=0)
    manifest = convert_depth(str(src), root / "onnx")
    return src, root / "onnx", manifest


def _session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_layout_and_manifest(exported):
    _, out, manifest = exported
    for f in ["model.onnx", "model.onnx_data", "config.json", "preprocessor_config.json"]:
        assert (out / f).is_file(), f
    on_disk = json.loads((out / "tcd_ort.json").read_text())
    assert on_disk == manifest
    assert manifest["format_version"] == 1
    assert manifest["kind"] == "depth-estimator"
    assert manifest["dtype"] == "float32"
    assert manifest["weights_keep_names"] is True
    io = manifest["components"]["depth_estimator"]
    size = TINY_IMAGE_SIZE
    assert io["inputs"] == {
        "pixel_values": {"dtype": "float32", "shape": ["batch", 3, size, size]}
    }
    assert io["outputs"] == {
        "predicted_depth": {"dtype": "float32", "shape": ["batch", size, size]}
    }
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    locations = {
        e.value for init in m.graph.initializer for e in init.external_data if e.key == "location"
    }
    assert locations == {"model.onnx_data"}


def test_preprocessor_is_dpt_hybrid_midas_at_the_tiny_size(exported):
    _, out, _ = exported
    saved = json.loads((out / "preprocessor_config.json").read_text())
    for key, value in DPT_HYBRID_MIDAS_PREPROCESSOR.items():
        if key == "size":
            assert saved["size"] == {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
        elif isinstance(value, float):
            assert saved[key] == pytest.approx(value)
        else:
            assert saved[key] == value, key
    assert saved["resample"] == 2  # BILINEAR, as dpt-hybrid-midas ships it


def test_config_is_a_hybrid_dpt(exported):
    src, out, _ = exported
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dpt"
    assert config["is_hybrid"] is True
    assert config["backbone_config"]["model_type"] == "bit"
    source = json.loads((src / "config.json").read_text())
    for key in ("image_size", "patch_size", "hidden_size", "neck_hidden_sizes", "readout_type"):
        assert config[key] == source[key], key


def test_initializer_names_are_parameter_names(exported):
    from transformers import DPTForDepthEstimation

    src, out, _ = exported
    model = DPTForDepthEstimation.from_pretrained(src)
    params = {name for name, _ in model.named_parameters()}
    names = initializer_names(out / "model.onnx")
    assert params & names, "no initializer carries a parameter name"
    assert not {n for n in names if n.startswith("model.")}


def test_onnxruntime_matches_torch_at_batch_two(exported):
    from transformers import DPTForDepthEstimation

    src, out, _ = exported
    model = DPTForDepthEstimation.from_pretrained(src).eval()
    torch.manual_seed(3)
    pixel_values = torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE) * 2 - 1
    with torch.no_grad():
        expected = model(pixel_values).predicted_depth.numpy()
    (actual,) = _session(out / "model.onnx").run(
        ["predicted_depth"], {"pixel_values": pixel_values.numpy()}
    )
    assert actual.shape == (2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    # The depth must have structure, or every comparison downstream is vacuous.
    assert expected.std() > 0.01 * abs(expected).max()
    assert not np.array_equal(expected[0], expected[1])
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * abs(expected).max())


def test_refuses_processors_with_varying_sizes():
    cls = image_processor_class()
    keep = cls(**{**DPT_HYBRID_MIDAS_PREPROCESSOR, "keep_aspect_ratio": True})
    with pytest.raises(UserError, match="keep_aspect_ratio"):
        fixed_input_size(keep)
    no_resize = cls(**{**DPT_HYBRID_MIDAS_PREPROCESSOR, "do_resize": False})
    with pytest.raises(UserError, match="do_resize"):
        fixed_input_size(no_resize)
    assert fixed_input_size(cls(**DPT_HYBRID_MIDAS_PREPROCESSOR)) == (384, 384)


def test_refuses_what_is_not_a_dpt(tmp_path):
    (tmp_path / "notdpt").mkdir()
    (tmp_path / "notdpt" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UserError, match="model_type 'bert'"):
        convert_depth(str(tmp_path / "notdpt"), tmp_path / "out")
    with pytest.raises(UserError, match="no config.json"):
        convert_depth(str(tmp_path), tmp_path / "out2")
    with pytest.raises(UserError, match="no such directory"):
        convert_depth(str(tmp_path / "missing" / "dir" / "x"), tmp_path / "out3")


def test_refuses_a_non_empty_out_dir(exported, tmp_path):
    src, _, _ = exported
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="--overwrite"):
        convert_depth(str(src), tmp_path)


def test_cli_tiny_depth(tmp_path):
    assert main(["-q", "tiny-depth", str(tmp_path / "tiny"), "--seed", "1"]) == 0
    assert (tmp_path / "tiny" / "config.json").is_file()
    assert (tmp_path / "tiny" / "preprocessor_config.json").is_file()
    with pytest.raises(SystemExit):
        main(["-q", "tiny-depth", str(tmp_path / "tiny")])  # not empty, no --overwrite
