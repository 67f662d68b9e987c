"""Builds the LoRA fixtures: random LoRAs for the tiny SD1.5 and SDXL pipelines in every common
key format, the weight deltas diffusers applies for each, multi-adapter deltas, bad inputs,
diffusers' TCD outputs with LoRAs, and an ONNX export with the LoRAs fused.

Run from the repository root with the pinned environment:

    .venv/bin/python tests/golden/make_lora.py [OUT_DIR]

OUT_DIR defaults to tests/fixtures/generated/lora. The base pipelines are the parity fixtures'
(tests/fixtures/generated/parity/<family>/diffusers), built with `python -m export tiny` if
missing. Everything under OUT_DIR/<family> is rewritten. Layout:

    OUT_DIR/<family>/<format>.safetensors         one random LoRA per key format
    OUT_DIR/<family>/<format>.deltas.safetensors  fused - base for every parameter diffusers
                                                  changed, as `unet.<param>`,
                                                  `text_encoder.<param>`, `text_encoder_2.<param>`
    OUT_DIR/<family>/index.json                   per format: modules, components, alphas, notes
    OUT_DIR/<family>/multi.json                   [{"file", "weight"}, ...] stacked adapters
    OUT_DIR/<family>/multi.deltas.safetensors     set_adapters(weights) + fuse_lora() deltas
    OUT_DIR/<family>/bad/*.safetensors            files the engine must reject (see index.json)
    OUT_DIR/<family>/cases.json                   TCD requests with "loras" / "fuse"
    OUT_DIR/<family>/reference/<case>.png/.npy    `python -m export reference` outputs
    OUT_DIR/<family>/fused_onnx/                  `python -m export convert --lora ... --fuse-lora`

Formats (all loaded by diffusers' `load_lora_weights`, which is where every delta comes from):

- `diffusers`: what `save_lora_weights` writes: `unet.<module>.lora_A.weight` /
  `lora_B.weight`, `text_encoder[_2].<module>...`; rank and alpha live in the safetensors
  header's `lora_adapter_metadata` JSON (`unet.r`, `unet.lora_alpha`, ...), not in tensors.
- `diffusers_old`: the pre-peft layout: attention processors
  (`...attn1.processor.to_q_lora.down.weight`), `<module>.lora.down/up.weight` elsewhere in
  the UNet, `self_attn.to_q_lora.down.weight` and `mlp.fc1.lora_linear_layer.down.weight` in
  text encoders. It has no alphas: diffusers applies these with scale 1 (alpha = rank).
- `kohya`: kohya-ss names on the diffusers UNet (`lora_unet_<module with _>.lora_down.weight`,
  `.lora_up.weight`, `.alpha`), `lora_te_` (SD1.5) / `lora_te1_`, `lora_te2_` (SDXL).
- `kohya_sgm` (SDXL): kohya's SGM/LDM UNet names (`lora_unet_input_blocks_4_1_...`,
  `middle_block_1_...`, `output_blocks_...`, resnets as `in_layers_2` / `out_layers_3` /
  `emb_layers_1`), the inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers` and
  `_convert_unet_lora_key`.

Every file's alpha is uniform within a component (as kohya and diffusers write them): diffusers
maps per-module kohya alphas that differ inside one component through `alpha_pattern` keys
that do not match attention modules, so mixed alphas would test a diffusers quirk, not LoRA.
"""

import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from goldenlib import export_cli  # noqa: E402

FAMILIES = ("sd15", "sdxl")
RANK = 4
# Per-component alpha (scale alpha / rank). Different per component so a Rust mapping that
# reads the wrong component's alpha shows up.
ALPHAS = {"unet": 2.0, "text_encoder": 6.0, "text_encoder_2": 3.0}
STD = 0.15
UNET_SUFFIXES = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "time_emb_proj",
)
TE_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
ATTN_OLD = {
    "to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora",
}
TE_ATTN_OLD = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora",
               "out_proj": "to_out_lora"}
FORMATS = {"sd15": ("diffusers", "diffusers_old", "kohya"),
           "sdxl": ("diffusers", "diffusers_old", "kohya", "kohya_sgm")}
MULTI = {"sd15": ("diffusers", "kohya"), "sdxl": ("diffusers", "kohya_sgm")}
MULTI_WEIGHTS = (1.0, 0.7)
PROMPT = "a photo of an astronaut riding a horse on mars"


def log(msg):
    print(msg, flush=True)


def components(pipe):
    names = ("unet", "text_encoder", "text_encoder_2")
    return [n for n in names if getattr(pipe, n, None) is not None]


def target_modules(pipe):
    """{component: [module name, ...]} of the Linear / Conv2d layers the random LoRAs touch."""
    out = {}
    for comp in components(pipe):
        suffixes = UNET_SUFFIXES if comp == "unet" else TE_SUFFIXES
        out[comp] = [
            name
            for name, m in getattr(pipe, comp).named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(suffixes)
            and (comp != "unet" or "resnets" in name or not name.endswith(("conv1", "conv2")))
        ]
    return out


def random_lora(pipe, modules, seed, alphas):
    """{component: {module: (A, B, alpha)}}; A [r, in(, kh, kw)], B [out, r(, 1, 1)]."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for comp, names in modules.items():
        mods = dict(getattr(pipe, comp).named_modules())
        out[comp] = {}
        for name in names:
            w = mods[name].weight
            if w.ndim == 4:
                a = torch.randn(RANK, w.shape[1], *w.shape[2:], generator=g) * STD
                b = torch.randn(w.shape[0], RANK, 1, 1, generator=g) * STD
            else:
                a = torch.randn(RANK, w.shape[1], generator=g) * STD
                b = torch.randn(w.shape[0], RANK, generator=g) * STD
            out[comp][name] = (a.contiguous(), b.contiguous(), alphas[comp])
    return out


# ---- writers -------------------------------------------------------------------------------

def file_module(comp, name):
    """The module name a legacy-format LoRA file uses. transformers 5 flattened CLIPTextModel
    (parameters are `encoder.layers...`, as in the ONNX export), but kohya and old diffusers
    files keep the `text_model.` prefix of the older layout; diffusers strips it when loading."""
    if comp != "unet" and not name.startswith("text_model."):
        return f"text_model.{name}"
    return name


def write_diffusers(pipe, lora, path):
    from peft import LoraConfig

    layers, metas = {}, {}
    for comp, mods in lora.items():
        layers[comp] = {}
        # The module names of today's models (no `text_model.`), as a LoRA trained with this
        # diffusers + transformers saves them: the adapter metadata's target_modules must match
        # the model's modules, which diffusers does not re-prefix.
        for name, (a, b, _) in mods.items():
            layers[comp][f"{name}.lora_A.weight"] = a
            layers[comp][f"{name}.lora_B.weight"] = b
        alpha = next(iter(mods.values()))[2]
        metas[comp] = LoraConfig(r=RANK, lora_alpha=alpha, target_modules=sorted(mods)).to_dict()
    kwargs = {
        "unet_lora_layers": layers["unet"],
        "text_encoder_lora_layers": layers["text_encoder"],
        "unet_lora_adapter_metadata": metas["unet"],
        "text_encoder_lora_adapter_metadata": metas["text_encoder"],
    }
    if "text_encoder_2" in layers:
        kwargs["text_encoder_2_lora_layers"] = layers["text_encoder_2"]
        kwargs["text_encoder_2_lora_adapter_metadata"] = metas["text_encoder_2"]
    type(pipe).save_lora_weights(str(path.parent), weight_name=path.name, **kwargs)


def write_diffusers_old(lora, path):
    sd = {}
    for comp, mods in lora.items():
        for name, (a, b, _) in mods.items():
            name = file_module(comp, name)
            parent, _, leaf = name.rpartition(".")
            if comp == "unet" and (".attn1." in name or ".attn2." in name):
                attn, _, proj = name.partition(".attn")
                attn = attn + ".attn" + proj[0]
                proj = proj[2:]
                key = f"{comp}.{attn}.processor.{ATTN_OLD[proj]}"
            elif comp == "unet":
                key = f"{comp}.{name}.lora"
            elif leaf in TE_ATTN_OLD:
                key = f"{comp}.{parent}.{TE_ATTN_OLD[leaf]}"
            else:
                key = f"{comp}.{name}.lora_linear_layer"
            sd[f"{key}.down.weight"] = a
            sd[f"{key}.up.weight"] = b
    save_file(sd, str(path))


KOHYA_TE = {"sd15": {"text_encoder": "lora_te"},
            "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


def write_kohya(lora, path, family, unet_name=lambda n: n):
    sd = {}
    for comp, mods in lora.items():
        prefix = "lora_unet" if comp == "unet" else KOHYA_TE[family][comp]
        for name, (a, b, alpha) in mods.items():
            mod = unet_name(name) if comp == "unet" else file_module(comp, name)
            key = f"{prefix}_{mod.replace('.', '_')}"
            sd[f"{key}.lora_down.weight"] = a
            sd[f"{key}.lora_up.weight"] = b
            sd[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    save_file(sd, str(path))


def sgm_name(unet_config):
    """diffusers UNet module name -> kohya SGM name (inverse of diffusers' SGM remapping)."""
    lpb = unet_config["layers_per_block"]
    resnet_inner = {
        "conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
    }

    def convert(name):
        parts = name.split(".")
        if parts[0] == "mid_block":
            inner, idx, rest = parts[1], int(parts[2]), parts[3:]
            sgm = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(inner, idx)]
            head = ["middle_block", str(sgm)]
        else:
            down = parts[0] == "down_blocks"
            block, inner, idx, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            # input_blocks.0 is conv_in, so down-block layers start at 1.
            n = block * (lpb + 1) + idx + (1 if down else 0)
            kind = "input_blocks" if down else "output_blocks"
            head = [kind, str(n), {"resnets": "0", "attentions": "1"}[inner]]
        if inner == "resnets":
            rest = resnet_inner[rest[0]].split(".")
        return ".".join(head + rest)

    return convert


# ---- golden deltas -------------------------------------------------------------------------

def snapshot(pipe):
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()}
            for c in components(pipe)}


def restore(pipe, base):
    for c, sd in base.items():
        getattr(pipe, c).load_state_dict(sd)


def fused_deltas(pipe, base, loads, weights=None):
    """Load `loads` (paths) as adapters, set_adapters(weights), fuse_lora, unload; returns
    {"<component>.<param>": fused - base} for every changed parameter and restores the base."""
    names = [f"a{i}" for i in range(len(loads))]
    for name, path in zip(names, loads, strict=True):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    if weights is not None:
        pipe.set_adapters(names, adapter_weights=list(weights))
    pipe.fuse_lora(components=components(pipe), lora_scale=1.0, adapter_names=names)
    pipe.unload_lora_weights()
    deltas = {}
    for c, sd in base.items():
        now = getattr(pipe, c).state_dict()
        if set(now) != set(sd):
            raise RuntimeError(f"{c}: parameter names changed after unload_lora_weights")
        for k, v in sd.items():
            d = (now[k] - v).float()
            if torch.any(d != 0):
                deltas[f"{c}.{k}"] = d.contiguous()
    restore(pipe, base)
    return deltas


def formula_deltas(loras, weights):
    """sum_i w_i * alpha_i / r * B_i @ A_i, the maths the engine does, for comparison."""
    out = {}
    for lora, w in zip(loras, weights, strict=True):
        for comp, mods in lora.items():
            for name, (a, b, alpha) in mods.items():
                d = (b.flatten(1) @ a.flatten(1)) * (w * alpha / RANK)
                shape = (b.shape[0], *a.shape[1:])
                key = f"{comp}.{name}.weight"
                out[key] = out.get(key, 0) + d.reshape(shape)
    return out


def compare(golden, expected):
    if set(golden) != set(expected):
        missing = sorted(set(expected) - set(golden))[:5]
        extra = sorted(set(golden) - set(expected))[:5]
        return float("inf"), f"missing {missing} extra {extra}"
    diff = max(float((golden[k] - expected[k]).abs().max()) for k in golden)
    return diff, None


def describe(path, lora, fmt):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    return {
        "file": path.name,
        "format": fmt,
        "modules": sum(len(m) for m in lora.values()),
        "tensors": len(keys),
        "components": {c: len(m) for c, m in lora.items()},
        "rank": RANK,
        # diffusers_old files carry no alpha: diffusers applies them with scale 1.
        "alpha": None if fmt == "diffusers_old"
        else {c: m[next(iter(m))][2] for c, m in lora.items()},
    }


# ---- bad inputs ----------------------------------------------------------------------------

def write_bad(fam_dir, family, out_root):
    bad = fam_dir / "bad"
    bad.mkdir()
    good = fam_dir / "diffusers.safetensors"
    data = good.read_bytes()
    (bad / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    g = torch.Generator().manual_seed(99)
    (bad / "not_safetensors.safetensors").write_bytes(
        bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist())
    )
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    sd = load_file(str(good))
    key_b = next(k for k in sd if k.endswith("lora_B.weight") and sd[k].ndim == 2)
    mismatch = dict(sd)
    mismatch[key_b] = mismatch[key_b][:, : RANK - 1].contiguous()
    save_file(mismatch, str(bad / "rank_mismatch.safetensors"), metadata=meta)
    key_a = key_b.replace("lora_B", "lora_A")
    nan = dict(sd)
    nan[key_a] = nan[key_a].clone()
    nan[key_a][0, 0] = float("nan")
    save_file(nan, str(bad / "nan.safetensors"), metadata=meta)
    notes = {
        "truncated.safetensors": "diffusers.safetensors cut in half",
        "not_safetensors.safetensors": "4096 random bytes",
        "rank_mismatch.safetensors": f"diffusers.safetensors with {key_b} cut to rank {RANK - 1}",
        "nan.safetensors": f"diffusers.safetensors with {key_a}[0, 0] = NaN",
    }
    other = {"sd15": "sdxl", "sdxl": "sd15"}[family]
    return bad, notes, other


def diffusers_verdict(pipe, base, path):
    """What diffusers does with a bad file: its error, or 'loaded' (the engine must still
    reject NaN; diffusers only checks with fuse_lora(safe_fusing=True))."""
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="bad")
        try:
            pipe.fuse_lora(components=components(pipe), safe_fusing=True, adapter_names=["bad"])
            verdict = "loaded and fused"
        except Exception as exc:  # noqa: BLE001 - recorded verbatim for the fixture notes
            verdict = f"loaded; fuse_lora(safe_fusing=True) raised {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001
        verdict = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    try:
        pipe.unload_lora_weights()
    except Exception:  # noqa: BLE001
        pass
    restore(pipe, base)
    return verdict


# ---- references and export -----------------------------------------------------------------

def cases(family):
    multi = [{"file": f"{MULTI[family][i]}.safetensors", "weight": w}
             for i, w in enumerate(MULTI_WEIGHTS)]
    one = [{"file": "diffusers.safetensors", "weight": 1.0}]
    out = []
    runs = (("single", one, False), ("multi", multi, False), ("fused", multi, True))
    for label, loras, fuse in runs:
        for guidance in (0.0, 2.0):
            out.append({
                "name": f"{label}_g{guidance}",
                "prompt": PROMPT,
                "steps": 4,
                "eta": 0.3,
                "guidance": guidance,
                "seed": 1238,
                "width": 64,
                "height": 64,
                "loras": loras,
                "fuse": fuse,
            })
    return out


def ensure_base(family):
    src = ROOT / "tests/fixtures/generated/parity" / family / "diffusers"
    if not (src / "model_index.json").exists():
        export_cli("tiny", "--family", family, src, "--overwrite")
    return src


def make_family(family, out):
    from diffusers import DiffusionPipeline

    t0 = time.perf_counter()
    fam_dir = out / family
    if fam_dir.exists():
        shutil.rmtree(fam_dir)
    fam_dir.mkdir(parents=True)
    src = ensure_base(family)
    pipe = DiffusionPipeline.from_pretrained(src, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base = snapshot(pipe)
    modules = target_modules(pipe)
    unet_config = dict(pipe.unet.config)

    index = {"family": family, "base": str(src.relative_to(ROOT)), "rank": RANK, "formats": {},
             "dropped": {}, "bad": {}}
    loras = {}
    for seed, fmt in enumerate(FORMATS[family]):
        alphas = {c: float(RANK) for c in ALPHAS} if fmt == "diffusers_old" else ALPHAS
        lora = random_lora(pipe, modules, 1000 * (1 + FAMILIES.index(family)) + seed, alphas)
        loras[fmt] = lora
        path = fam_dir / f"{fmt}.safetensors"
        if fmt == "diffusers":
            write_diffusers(pipe, lora, path)
        elif fmt == "diffusers_old":
            write_diffusers_old(lora, path)
        elif fmt == "kohya":
            write_kohya(lora, path, family)
        elif fmt == "kohya_sgm":
            write_kohya(lora, path, family, sgm_name(unet_config))
        deltas = fused_deltas(pipe, base, [path])
        diff, problem = compare(deltas, formula_deltas([lora], [1.0]))
        if problem is not None or diff > 1e-5:
            raise RuntimeError(f"{family}/{fmt}: diffusers' deltas differ from the LoRA maths "
                               f"({problem or diff}); fix the writer")
        save_file(deltas, str(fam_dir / f"{fmt}.deltas.safetensors"))
        entry = describe(path, lora, fmt)
        entry.update({"deltas": f"{fmt}.deltas.safetensors", "changed_params": len(deltas),
                      "max_abs_diff_vs_formula": diff})
        index["formats"][fmt] = entry
        log(f"{family}: {fmt}: {entry['modules']} modules, max |diffusers - formula| {diff:.2e}")

    # Raw peft state dicts (`base_model.model.<module>.lora_A.weight`) are not a LoRA file
    # format diffusers reads: load_lora_weights keeps only keys under `unet.` / `text_encoder.`,
    # so such a file loads nothing. Checked here so the note stays true for this diffusers.
    peft_path = fam_dir / "peft_probe.safetensors"
    save_file({f"base_model.model.{k}": v for k, v in load_file(
        str(fam_dir / "diffusers.safetensors")).items() if k.startswith("unet.")}, str(peft_path))
    try:
        peft_deltas = fused_deltas(pipe, base, [peft_path])
        peft_note = f"load_lora_weights changed {len(peft_deltas)} parameters"
    except Exception as exc:  # noqa: BLE001
        peft_note = f"load_lora_weights raised {type(exc).__name__}: {str(exc)[:200]}"
    peft_path.unlink()
    index["dropped"]["peft"] = (
        "raw peft keys (base_model.model.<module>.lora_A.weight) are not accepted by diffusers' "
        f"load_lora_weights ({peft_note}); the diffusers format is peft's keys under a "
        "component prefix"
    )

    names = MULTI[family]
    multi = [
        {"file": f"{n}.safetensors", "weight": w}
        for n, w in zip(names, MULTI_WEIGHTS, strict=True)
    ]
    (fam_dir / "multi.json").write_text(json.dumps(multi, indent=1) + "\n")
    paths = [fam_dir / m["file"] for m in multi]
    deltas = fused_deltas(pipe, base, paths, MULTI_WEIGHTS)
    diff, problem = compare(deltas, formula_deltas([loras[n] for n in names], MULTI_WEIGHTS))
    if problem is not None or diff > 1e-5:
        raise RuntimeError(f"{family}/multi: deltas differ from the maths ({problem or diff})")
    save_file(deltas, str(fam_dir / "multi.deltas.safetensors"))
    index["multi"] = {"adapters": multi, "deltas": "multi.deltas.safetensors",
                      "changed_params": len(deltas), "max_abs_diff_vs_formula": diff}

    bad, notes, other = write_bad(fam_dir, family, out)
    index["bad"] = {name: {"what": what} for name, what in notes.items()}
    other_path = bad / "other_base.safetensors"
    other_pipe_src = ensure_base(other)
    other_pipe = DiffusionPipeline.from_pretrained(other_pipe_src, dtype=torch.float32)
    write_diffusers(other_pipe, random_lora(other_pipe, target_modules(other_pipe), 7, ALPHAS),
                    other_path)
    del other_pipe
    index["bad"]["other_base.safetensors"] = {
        "what": f"a diffusers-format LoRA for the tiny {other} pipeline (shapes do not fit)"}
    for name in index["bad"]:
        verdict = diffusers_verdict(pipe, base, bad / name)
        index["bad"][name]["diffusers"] = verdict.replace(str(bad / name), name)
    log(f"{family}: LoRA files, deltas and bad inputs in {time.perf_counter() - t0:.1f}s")
    del pipe

    (fam_dir / "cases.json").write_text(json.dumps(cases(family), indent=1) + "\n")
    secs = export_cli("reference", "--model", src, "--cases", fam_dir / "cases.json",
                      "--out-dir", fam_dir / "reference")
    log(f"{family}: references in {secs:.1f}s")
    lora_args = []
    for m in multi:
        lora_args += ["--lora", f"{fam_dir / m['file']}:{m['weight']}"]
    secs = export_cli("convert", src, fam_dir / "fused_onnx", *lora_args, "--fuse-lora")
    index["fused_onnx"] = {"dir": "fused_onnx", "loras": multi}
    log(f"{family}: fused export in {secs:.1f}s")
    (fam_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    log(f"{family}: done in {time.perf_counter() - t0:.1f}s")


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/generated/lora"
    if not out.is_absolute():
        out = Path.cwd() / out
    import logging
    import warnings

    from diffusers.utils import logging as diffusers_logging

    from export.cli import _quiet_libraries

    _quiet_libraries()
    warnings.filterwarnings("ignore")
    # The bad inputs make diffusers log its own (long) errors; index.json records them.
    diffusers_logging.set_verbosity(logging.CRITICAL)
    logging.getLogger("diffusers").setLevel(logging.CRITICAL)
    torch.set_num_threads(2)
    t = time.perf_counter()
    for family in FAMILIES:
        make_family(family, out)
    log(f"wrote {out} in {time.perf_counter() - t:.1f}s")


if __name__ == "__main__":
    main()
