"""`convert --lora-slots RANK`: the slot export's names and manifest, its equality with the plain
export while the slots are empty, slots filled the way the engine fills them against
diffusers' unfused `load_lora_weights` + `set_adapters`, and the slots as overridable
initializers: fed at run time to one loaded session (the whole UNet and its segments).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from export.cli import main as cli_main
from export.convert import convert
from export.errors import UserError
from export.lora_slots import TARGET_MODULES, slot_param_name, slot_tensor_names
from export.segments import segment_files
from export.unet import plain_inputs

RANK = 8
LORA_RANK = 4
TOL = 1e-4


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def slotted(sd15, tmp_path_factory):
    out = tmp_path_factory.mktemp("slots") / "onnx"
    manifest = convert(str(sd15.src), out, lora_slots=RANK)
    return out, manifest


def _feeds(unet):
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(2, 4, 16, 24, generator=g),
        "timestep": torch.tensor([499.0, 7.0]),
        "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=g),
    }


def _onnx_feeds(unet):
    """`_feeds` plus the zero inputs every UNet export takes without a ControlNet or an
    IP-Adapter, as numpy."""
    feeds = dict(_feeds(unet))
    feeds.update(plain_inputs(unet, 2, 16, 24))
    return {k: v.numpy() for k, v in feeds.items()}


def _session(path, overrides=None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if overrides:
        names = list(overrides)
        values = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(overrides[n])) for n in names
        ]
        opts.add_external_initializers(names, values)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_peft_names_become_plain_names() -> None:
    assert slot_param_name("a.to_q.base_layer.weight") == "a.to_q.weight"
    assert slot_param_name("a.conv1.base_layer.bias") == "a.conv1.bias"
    assert slot_param_name("a.to_q.lora_A.tcd_ort_slot.weight") == "a.to_q.lora_A.weight"
    assert slot_param_name("a.to_out.0.lora_B.tcd_ort_slot.weight") == "a.to_out.0.lora_B.weight"
    assert slot_param_name("conv_in.weight") == "conv_in.weight"


def test_manifest_and_initializers(sd15, slotted) -> None:
    out, manifest = slotted
    slots = manifest["lora_slots"]
    assert list(slots) == ["unet"]
    unet = slots["unet"]
    assert unet["rank"] == RANK and unet["lora_alpha"] == RANK
    assert unet["target_modules"] == list(TARGET_MODULES)
    assert unet["lora_a"] == "{module}.lora_A.weight"
    assert unet["lora_b"] == "{module}.lora_B.weight"
    assert unet["overridable"] is True
    on_disk = json.loads((out / "tcd_ort.json").read_text())
    assert on_disk["lora_slots"] == slots

    # Every Linear / Conv2d the peft targets match has a slot, and nothing else does.
    expected = sorted(
        name
        for name, m in sd15.pipe.unet.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        and any(name == t or name.endswith("." + t) for t in TARGET_MODULES)
    )
    assert unet["modules"] == expected
    assert any(m.endswith("conv_shortcut") for m in expected)
    assert any(m.endswith("downsamplers.0.conv") for m in expected)

    model = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    assert not [n for n in inits if "base_layer" in n or "tcd_ort_slot" in n]
    # The base weights keep the plain export's names and shapes.
    plain = onnx.load(str(sd15.dir / "unet" / "model.onnx"), load_external_data=False)
    plain_inits = {i.name: list(i.dims) for i in plain.graph.initializer}
    assert {n: list(inits[n].dims) for n in plain_inits} == plain_inits
    params = dict(sd15.pipe.unet.named_parameters())
    for module in expected:
        w = params[f"{module}.weight"]
        a = inits[f"{module}.lora_A.weight"]
        b = inits[f"{module}.lora_B.weight"]
        assert a.data_location == onnx.TensorProto.EXTERNAL
        assert b.data_location == onnx.TensorProto.EXTERNAL
        if w.ndim == 4:
            assert list(a.dims) == [RANK, w.shape[1], *w.shape[2:]]
            assert list(b.dims) == [w.shape[0], RANK, 1, 1]
        else:
            assert list(a.dims) == [RANK, w.shape[1]]
            assert list(b.dims) == [w.shape[0], RANK]
    assert len(inits) == len(plain_inits) + 2 * len(expected)


def test_empty_slots_compute_the_plain_export(sd15, slotted) -> None:
    out, _ = slotted
    feeds = _onnx_feeds(sd15.pipe.unet)
    plain = sd15.session("unet").run(["out_sample"], feeds)[0]
    got = _session(out / "unet" / "model.onnx").run(["out_sample"], feeds)[0]
    assert _max_diff(got, plain) <= 1e-6 * float(np.abs(plain).max())


def _random_lora(unet, modules, seed):
    g = torch.Generator().manual_seed(seed)
    mods = dict(unet.named_modules())
    lora = {}
    for name in modules:
        w = mods[name].weight
        if w.ndim == 4:
            a = torch.randn(LORA_RANK, w.shape[1], *w.shape[2:], generator=g) * 0.2
            b = torch.randn(w.shape[0], LORA_RANK, 1, 1, generator=g) * 0.2
        else:
            a = torch.randn(LORA_RANK, w.shape[1], generator=g) * 0.2
            b = torch.randn(w.shape[0], LORA_RANK, generator=g) * 0.2
        lora[name] = (a.contiguous(), b.contiguous())
    return lora


def test_filled_slots_match_diffusers_unfused_adapters(sd15, slotted, tmp_path) -> None:
    """Two adapters (weights 1.0 and 0.7, alpha = rank) over linear, 1x1 and 3x3 conv layers,
    strided convs and shortcuts; one module only in the first adapter (zero-padded slot)."""
    from diffusers import DiffusionPipeline

    out, manifest = slotted
    modules = manifest["lora_slots"]["unet"]["modules"]
    picks = [
        next(m for m in modules if m.endswith(suffix))
        for suffix in (
            "attn1.to_q",
            "attn2.to_v",
            "proj_in",
            "ff.net.0.proj",
            "conv1",
            "conv_shortcut",
            "downsamplers.0.conv",
            "upsamplers.0.conv",
            "time_emb_proj",
        )
    ]
    pipe = DiffusionPipeline.from_pretrained(sd15.src, dtype=torch.float32)
    loras = [_random_lora(pipe.unet, picks, 1), _random_lora(pipe.unet, picks[1:], 2)]
    weights = [1.0, 0.7]
    for i, lora in enumerate(loras):
        sd = {}
        for name, (a, b) in lora.items():
            sd[f"unet.{name}.lora_A.weight"] = a
            sd[f"unet.{name}.lora_B.weight"] = b
        save_file(sd, str(tmp_path / f"l{i}.safetensors"))
        pipe.load_lora_weights(str(tmp_path), weight_name=f"l{i}.safetensors", adapter_name=f"l{i}")
    pipe.set_adapters(["l0", "l1"], adapter_weights=weights)
    feeds = _feeds(pipe.unet)
    with torch.no_grad():
        ref = pipe.unet(**feeds).sample.numpy()

    # The engine's filling: A rows and scaled B columns concatenated, zero-padded to RANK.
    overrides = {}
    for name in picks:
        parts = [(lora[name], w) for lora, w in zip(loras, weights, strict=True) if name in lora]
        a = torch.cat([a for (a, _), _ in parts], 0)
        b = torch.cat([b * w for (_, b), w in parts], 1)
        pad = RANK - a.shape[0]
        a = torch.cat([a, torch.zeros(pad, *a.shape[1:])], 0)
        b = torch.cat([b, torch.zeros(b.shape[0], pad, *b.shape[2:])], 1)
        overrides[f"{name}.lora_A.weight"] = a.numpy()
        overrides[f"{name}.lora_B.weight"] = b.numpy()
    got = _session(out / "unet" / "model.onnx", overrides).run(
        ["out_sample"], _onnx_feeds(pipe.unet)
    )[0]
    scale = float(np.abs(ref).max())
    assert _max_diff(got, ref) <= TOL * scale
    base = sd15.session("unet").run(["out_sample"], _onnx_feeds(pipe.unet))[0]
    # The adapters really moved the output.
    assert _max_diff(base, ref) > 1e-2 * scale

    # The same slots fed at run time to a session loaded with empty slots (the engine's LoRA
    # swap), then not fed again: the base output.
    sess = _session(out / "unet" / "model.onnx")
    fed = sess.run(["out_sample"], {**_onnx_feeds(pipe.unet), **overrides})[0]
    assert _max_diff(fed, got) <= 1e-5 * scale
    assert _max_diff(fed, ref) <= TOL * scale
    unfed = sess.run(["out_sample"], _onnx_feeds(pipe.unet))[0]
    assert _max_diff(unfed, base) <= 1e-6 * float(np.abs(base).max())


def _slot_values(unet, modules, seed):
    """Random full-rank slot tensors for `modules`, by exported name."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(unet.named_modules())
    values = {}
    for name in modules:
        w = mods[name].weight
        if w.ndim == 4:
            a = torch.randn(RANK, w.shape[1], *w.shape[2:], generator=g) * 0.1
            b = torch.randn(w.shape[0], RANK, 1, 1, generator=g) * 0.1
        else:
            a = torch.randn(RANK, w.shape[1], generator=g) * 0.1
            b = torch.randn(w.shape[0], RANK, generator=g) * 0.1
        values[f"{name}.lora_A.weight"] = a.numpy()
        values[f"{name}.lora_B.weight"] = b.numpy()
    return values


def test_slots_are_overridable_initializers(sd15, slotted) -> None:
    """The slot tensors, and only they, are graph inputs with a default: ONNX Runtime's
    overridable initializers; the required inputs (and the manifest's) are the plain
    export's."""
    out, manifest = slotted
    modules = manifest["lora_slots"]["unet"]["modules"]
    path = out / "unet" / "model.onnx"
    sess = _session(path)
    over = {i.name: i for i in sess.get_overridable_initializers()}
    assert sorted(over) == sorted(slot_tensor_names(modules))
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    for name, meta in over.items():
        assert meta.type == "tensor(float)"
        assert meta.shape == list(inits[name].dims)
        assert inits[name].data_location == onnx.TensorProto.EXTERNAL
    declared = [i.name for i in model.graph.input]
    assert not [n for n in declared if n in inits and n not in over], "base weights stay plain"

    def io(s):
        return [(i.name, i.type, i.shape) for i in s.get_inputs()]

    assert io(sess) == io(sd15.session("unet"))
    assert manifest["components"]["unet"]["inputs"] == sd15.manifest["components"]["unet"]["inputs"]


def test_fed_slots_match_baked_slots(sd15, slotted) -> None:
    """Slots fed at run time compute what the same values replaced at session creation do, and
    slots not fed compute the base model; one session, fed, unfed and fed again."""
    out, manifest = slotted
    modules = manifest["lora_slots"]["unet"]["modules"]
    unet = sd15.pipe.unet
    # Every other module: the rest keep their empty default while others are fed.
    values = _slot_values(unet, modules[::2], 3)
    feeds = _onnx_feeds(unet)
    path = out / "unet" / "model.onnx"
    baked = _session(path, values).run(["out_sample"], feeds)[0]
    base = sd15.session("unet").run(["out_sample"], feeds)[0]
    scale = float(np.abs(baked).max())
    assert _max_diff(baked, base) > 1e-2 * scale, "the slot values must move the output"
    sess = _session(path)
    fed = sess.run(["out_sample"], {**feeds, **values})[0]
    assert _max_diff(fed, baked) <= 1e-5 * scale
    unfed = sess.run(["out_sample"], feeds)[0]
    assert _max_diff(unfed, base) <= 1e-6 * float(np.abs(base).max())
    again = sess.run(["out_sample"], {**feeds, **values})[0]
    assert _max_diff(again, fed) <= 1e-6 * scale


def test_segments_expose_their_slots(sd15, slotted) -> None:
    """Each low-memory segment declares the slot tensors it reads as overridable initializers;
    fed chained, they compute the whole UNet fed the same values, and unfed the base model."""
    out, manifest = slotted
    modules = manifest["lora_slots"]["unet"]["modules"]
    unet_dir = out / "unet"
    names = segment_files(unet_dir)
    assert manifest["components"]["unet"]["segments"] == names
    assert len(names) >= 2
    paths = [unet_dir / n for n in names]
    sessions = [_session(p) for p in paths]
    slot_names = set(slot_tensor_names(modules))
    seen: set[str] = set()
    for path, sess in zip(paths, sessions, strict=True):
        model = onnx.load(str(path), load_external_data=False)
        used = {i.name for i in model.graph.initializer} & slot_names
        assert used, f"{path.name} reads no slot"
        assert {i.name for i in sess.get_overridable_initializers()} == used
        assert not slot_names & {i.name for i in sess.get_inputs()}
        seen |= used
    assert seen == slot_names

    def chain(feeds):
        values = dict(feeds)
        for sess in sessions:
            outs = [o.name for o in sess.get_outputs()]
            wanted = [i.name for i in sess.get_inputs()]
            wanted += [i.name for i in sess.get_overridable_initializers()]
            inputs = {n: values[n] for n in wanted if n in values}
            values.update(zip(outs, sess.run(outs, inputs), strict=True))
        return values["out_sample"]

    unet = sd15.pipe.unet
    values = _slot_values(unet, modules, 4)
    feeds = _onnx_feeds(unet)
    whole = _session(unet_dir / "model.onnx")
    expected = whole.run(["out_sample"], {**feeds, **values})[0]
    base = whole.run(["out_sample"], feeds)[0]
    scale = float(np.abs(expected).max())
    assert _max_diff(expected, base) > 1e-2 * scale
    assert _max_diff(chain({**feeds, **values}), expected) <= 1e-5 * scale
    assert _max_diff(chain(feeds), base) <= 1e-5 * float(np.abs(base).max())


def test_plain_export_has_no_slots(sd15) -> None:
    assert "lora_slots" not in sd15.manifest


def test_bad_rank_is_a_user_error(sd15, tmp_path) -> None:
    with pytest.raises(UserError, match="positive integer"):
        convert(str(sd15.src), tmp_path / "out", lora_slots=0)
    with pytest.raises(SystemExit):
        cli_main(["-q", "convert", str(sd15.src), str(tmp_path / "o"), "--lora-slots", "x"])
