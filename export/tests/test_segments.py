"""The UNet in segments (export/segments.py): what `convert` writes for low-memory mode.

Chained in ONNX Runtime, the segments must compute what the whole UNet computes, read their
weights from the UNet's own data file (nothing copied), and be cut where the largest segment's
weights are smallest.
"""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import onnx
import pytest

from export.cli import main
from export.segments import _block, _numel_bytes, plan_cuts, segment_files, split, write_segments
from export.unet import IP_SCALE, ip_adapter_inputs, residual_inputs


def _feeds(exported) -> dict:
    """UNet inputs at 24x40 latents (odd downsampled sizes), random ControlNet residuals (so
    the residual inputs are exercised too)."""
    import torch

    g = torch.Generator().manual_seed(0)
    cfg = exported.pipe.unet.config
    b, h, w = 1, 24, 40
    feeds = {
        "sample": torch.randn(b, cfg.in_channels, h, w, generator=g),
        "timestep": torch.tensor([499.0]),
        "encoder_hidden_states": torch.randn(b, 77, cfg.cross_attention_dim, generator=g),
    }
    if exported.family == "sdxl":
        feeds["text_embeds"] = torch.randn(b, 32, generator=g)
        feeds["time_ids"] = torch.tensor([[h * 2.0, w * 2.0, 0.0, 0.0, h * 2.0, w * 2.0]])
    feeds.update(residual_inputs(cfg, b, h, w, g))
    # A random IP-Adapter branch (two image tokens, scale 0.5), so its inputs reach the
    # segments that read them.
    for name, zero in ip_adapter_inputs(exported.pipe.unet, b).items():
        if name == IP_SCALE:
            feeds[name] = torch.full(zero.shape, 0.5)
        else:
            feeds[name] = torch.randn(b, 2, zero.shape[2], generator=g)
    return {k: v.numpy() for k, v in feeds.items()}


def _run_chain(paths, feeds) -> np.ndarray:
    import onnxruntime as ort

    values = dict(feeds)
    for path in paths:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        inputs = {i.name: values[i.name] for i in sess.get_inputs()}
        values.update(zip(names, sess.run(names, inputs), strict=True))
    return values["out_sample"]


def test_convert_writes_two_segments_listed_in_the_manifest(exported):
    unet_dir = exported.dir / "unet"
    assert segment_files(unet_dir) == ["segment_0.onnx", "segment_1.onnx"]
    manifest = json.loads((exported.dir / "tcd_ort.json").read_text())
    assert manifest["components"]["unet"]["segments"] == ["segment_0.onnx", "segment_1.onnx"]
    for other in ("text_encoder", "vae_decoder", "vae_encoder"):
        assert "segments" not in manifest["components"][other]


def test_segments_compute_the_whole_unet(exported):
    whole = exported.session("unet")
    feeds = _feeds(exported)
    expected = whole.run(["out_sample"], feeds)[0]
    unet_dir = exported.dir / "unet"
    got = _run_chain([unet_dir / f for f in segment_files(unet_dir)], feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert np.abs(expected).max() > 1e-3, "a UNet output of zeros proves nothing"


def test_segments_share_the_unet_weights_file(exported):
    unet_dir = exported.dir / "unet"
    whole = onnx.load(str(unet_dir / "model.onnx"), load_external_data=False)
    where = {
        i.name: {e.key: e.value for e in i.external_data}
        for i in whole.graph.initializer
        if i.data_location == onnx.TensorProto.EXTERNAL
    }
    assert where, "the exporter keeps weights in model.onnx_data"
    seen: set[str] = set()
    for name in segment_files(unet_dir):
        seg = onnx.load(str(unet_dir / name), load_external_data=False)
        for init in seg.graph.initializer:
            if init.name in where:
                assert init.data_location == onnx.TensorProto.EXTERNAL, init.name
                assert {e.key: e.value for e in init.external_data} == where[init.name]
            seen.add(init.name)
        assert (unet_dir / name).stat().st_size < (unet_dir / "model.onnx").stat().st_size
    assert seen == {i.name for i in whole.graph.initializer}, "every weight is in some segment"


def test_three_segments_and_the_cut_plan(sd15, tmp_path):
    unet_dir = tmp_path / "unet"
    shutil.copytree(sd15.dir / "unet", unet_dir)
    model = onnx.load(str(unet_dir / "model.onnx"), load_external_data=False)
    names = write_segments(unet_dir, 3, "model.onnx")
    assert names == ["segment_0.onnx", "segment_1.onnx", "segment_2.onnx"]
    assert segment_files(unet_dir) == names
    whole = sd15.session("unet")
    feeds = _feeds(sd15)
    np.testing.assert_allclose(
        _run_chain([unet_dir / n for n in names], feeds),
        whole.run(["out_sample"], feeds)[0],
        rtol=1e-4,
        atol=1e-5,
    )
    # The plan is the best of all cuts at block starts: brute force over every pair agrees.

    sizes = {i.name: _numel_bytes(i) for i in model.graph.initializer}
    starts: dict[str, int] = {}
    for idx, node in enumerate(model.graph.node):
        for x in node.input:
            if x in sizes:
                starts.setdefault(_block(x), idx)
    first = min(starts.values())
    candidates = sorted(set(starts.values()) - {first})

    def largest(cuts):
        bounds = [0, *cuts, len(model.graph.node)]
        best = 0
        for a, b in itertools.pairwise(bounds):
            names_read = {x for n in model.graph.node[a:b] for x in n.input if x in sizes}
            best = max(best, sum(sizes[x] for x in names_read))
        return best

    optimum = min(largest(c) for c in itertools.combinations(candidates, 2))
    assert largest(plan_cuts(model, 3)) == optimum
    # Fewer parts again replaces the files.
    write_segments(unet_dir, 2, "model.onnx")
    assert segment_files(unet_dir) == ["segment_0.onnx", "segment_1.onnx"]


def test_segment_command_rewrites_and_removes(sd15, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(sd15.dir, model_dir)
    assert main(["-q", "segment", str(model_dir), "--parts", "3"]) == 0
    manifest = json.loads((model_dir / "tcd_ort.json").read_text())
    assert len(manifest["components"]["unet"]["segments"]) == 3
    assert main(["-q", "segment", str(model_dir), "--parts", "1"]) == 0
    manifest = json.loads((model_dir / "tcd_ort.json").read_text())
    assert "segments" not in manifest["components"]["unet"]
    assert segment_files(model_dir / "unet") == []
    (model_dir / "tcd_ort.json").unlink()
    with pytest.raises(SystemExit) as exc:
        main(["-q", "segment", str(model_dir)])
    assert exc.value.code == 2


def test_too_few_blocks_are_refused(sd15):
    model = onnx.load(str(sd15.dir / "unet" / "model.onnx"), load_external_data=False)
    with pytest.raises(ValueError, match="too few"):
        split(model, 50)
    with pytest.raises(ValueError, match="at least 2"):
        split(model, 1)
