"""`convert --dtype fp16`: float16 text encoder and UNet, float32 VAE, names kept, a manifest
that says so, and graphs that still compute what the float16 PyTorch modules compute."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from export.convert import cast_pipeline, convert, torch_dtype
from export.errors import UserError
from export.layout import ONNX_FILE
from export.unet import plain_inputs

F16 = onnx.TensorProto.FLOAT16
F32 = onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def fp16_export(sd15, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "onnx"
    manifest = convert(str(sd15.src), out, dtype="fp16")
    return out, manifest


def _float_initializers(path):
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: i.data_type for i in model.graph.initializer if i.data_type in (F16, F32)}


def test_weights_and_io_dtypes(fp16_export):
    out, manifest = fp16_export
    assert manifest["dtype"] == "float16"
    comps = manifest["components"]
    for name in ("text_encoder", "unet"):
        inits = _float_initializers(out / name / ONNX_FILE)
        assert inits and all(t == F16 for t in inits.values()), name
        assert comps[name]["weights_dtype"] == "float16"
        assert all(o["dtype"] == "float16" for o in comps[name]["outputs"].values()), name
    unet = comps["unet"]["inputs"]
    assert unet["timestep"]["dtype"] == "float32"
    for io, spec in unet.items():
        if io != "timestep":
            assert spec["dtype"] == "float16", io
    assert "mid_block_additional_residual" in unet
    assert comps["text_encoder"]["inputs"]["input_ids"]["dtype"] == "int32"
    for name in ("vae_decoder", "vae_encoder"):
        inits = _float_initializers(out / name / ONNX_FILE)
        assert all(t == F32 for t in inits.values()), name
        assert comps[name]["weights_dtype"] == "float32"
        spec = comps[name]
        ends = [*spec["inputs"].values(), *spec["outputs"].values()]
        assert all(v["dtype"] == "float32" for v in ends)


def test_names_kept(sd15, fp16_export):
    out, _ = fp16_export
    names = set(_float_initializers(out / "unet" / ONNX_FILE))
    params = {n for n, _ in sd15.pipe.unet.named_parameters()}
    assert params <= names


def test_unet_matches_torch_fp16(sd15, fp16_export):
    import onnxruntime as ort

    out, _ = fp16_export
    unet = sd15.pipe.unet
    g = torch.Generator().manual_seed(0)
    b, h, w = 2, 12, 16
    sample = torch.randn(b, 4, h, w, generator=g)
    timestep = torch.tensor([999.0, 499.0])
    ehs = torch.randn(b, 77, unet.config.cross_attention_dim, generator=g)
    feeds = {"sample": sample, "encoder_hidden_states": ehs}
    feeds.update(plain_inputs(unet, b, h, w))
    feeds = {k: v.half().numpy() for k, v in feeds.items()}
    feeds["timestep"] = timestep.numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(
        str(out / "unet" / ONNX_FILE), opts, providers=["CPUExecutionProvider"]
    )
    got = sess.run(None, feeds)[0]
    assert got.dtype == np.float16
    with torch.no_grad():
        ref32 = unet(sample, timestep, ehs).sample.numpy()
        unet16 = type(unet).from_config(unet.config).to(torch.float16)
        unet16.load_state_dict(unet.state_dict())
        ref16 = unet16(sample.half(), timestep, ehs.half()).sample.float().numpy()
    scale = np.abs(ref32).max()
    # ONNX Runtime's CPU provider runs most float16 nodes through float32 kernels, PyTorch in
    # float16: both stay within a few 1e-3 of float32; a wrong cast would be of order one.
    assert np.abs(got.astype(np.float32) - ref16).max() / scale < 1e-2
    assert np.abs(got.astype(np.float32) - ref32).max() / scale < 1e-2


def test_bad_dtype_is_a_user_error():
    with pytest.raises(UserError, match="fp16"):
        torch_dtype("bf16")


def test_cast_pipeline_keeps_vae_float32(sd15):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sd15.src, dtype=torch.float32)
    cast_pipeline(pipe, torch.float16, torch.float32)
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    assert pipe.vae.dtype == torch.float32
