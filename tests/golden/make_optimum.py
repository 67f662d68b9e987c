"""Exports the tiny parity pipelines with plain `optimum-cli export onnx`, so the Rust tests can
check that tcd-ort loads optimum's output as-is (no manifest, vocab.json + merges.txt tokenizers,
int64 token ids, a scalar timestep).

Run from the repository root with the optimum environment (export/requirements-optimum.txt),
after tests/golden/make_parity.py has built the diffusers pipelines:

    .venv-optimum/bin/python tests/golden/make_optimum.py [PARITY_DIR [OUT_DIR]]

PARITY_DIR defaults to tests/fixtures/generated/parity and OUT_DIR to
tests/fixtures/generated/optimum. For each family the command run is

    optimum-cli export onnx --model PARITY_DIR/<family>/diffusers --task text-to-image \
        OUT_DIR/<family>

with nothing added or changed afterwards. The weights are the parity pipelines' own, so the
diffusers references in PARITY_DIR/<family>/reference apply to these exports directly.

The optimum environment's diffusers 0.39 reads the pipelines written by the main environment's
diffusers 0.42 unchanged, with one exception: transformers 5 saves `CLIPTextModel` weights without
the `text_model.` prefix that transformers 4.57 expects (`CLIPTextModelWithProjection` keeps it),
and 4.57 would silently initialise the unmatched encoder at random. So `--model` is a scratch copy
of the pipeline in which those tensors are renamed, not changed, and the script checks that
transformers 4.57 then finds every weight before exporting. Real checkpoints on the hub, saved by
transformers 4, already have the prefix. OUT_DIR/versions.json records the package versions that
made the exports; exports already present are kept.
"""

import json
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("sd15", "sdxl")
PACKAGES = ("optimum-onnx", "optimum", "transformers", "diffusers", "torch", "onnx")


def encoders(pipe):
    return sorted(p.parent for p in pipe.glob("text_encoder*/model.safetensors"))


def readable_copy(pipe, scratch):
    """Copies `pipe` to `scratch`, giving transformers-5 `CLIPTextModel` weights the
    `text_model.` prefix transformers 4 loads them under; returns the copy."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModel, CLIPTextModel, CLIPTextModelWithProjection

    copy = scratch / pipe.name
    shutil.copytree(pipe, copy)
    for encoder in encoders(copy):
        weights_path = encoder / "model.safetensors"
        weights = load_file(weights_path)
        if not any(k.startswith("text_model.") for k in weights):
            weights = {f"text_model.{k}": v for k, v in weights.items()}
            save_file(weights, weights_path, metadata={"format": "pt"})
        arch = AutoConfig.from_pretrained(encoder).architectures[0]
        cls = {"CLIPTextModel": CLIPTextModel,
               "CLIPTextModelWithProjection": CLIPTextModelWithProjection}.get(arch, AutoModel)
        _, info = cls.from_pretrained(encoder, output_loading_info=True)
        if info["missing_keys"] or info["unexpected_keys"]:
            sys.exit(f"{encoder}: transformers cannot match the weights: {info}")
    return copy


def export(pipe, dest):
    # Export into a scratch directory first so an interrupted run never leaves a half-written
    # model directory that a later run would keep.
    scratch = dest.with_name(dest.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    cli = Path(sys.executable).with_name("optimum-cli")
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        source = readable_copy(pipe, Path(tmp))
        args = [cli, "export", "onnx", "--model", source, "--task", "text-to-image", scratch]
        print("+", " ".join(str(a) for a in args), flush=True)
        subprocess.run([str(a) for a in args], check=True, cwd=ROOT)
    shutil.rmtree(dest, ignore_errors=True)
    scratch.rename(dest)
    print(f"exported {dest} in {time.monotonic() - start:.0f} s", flush=True)


def main():
    parity = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/generated/parity"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "tests/fixtures/generated/optimum"
    out.mkdir(parents=True, exist_ok=True)
    for family in FAMILIES:
        pipe = parity / family / "diffusers"
        if not (pipe / "model_index.json").is_file():
            sys.exit(
                f"{pipe} is missing: run tests/golden/make_parity.py first (or `make fixtures`)"
            )
        dest = out / family
        if (dest / "model_index.json").is_file():
            print(f"{dest} exists, kept", flush=True)
            continue
        export(pipe, dest)
    versions = {name: version(name) for name in PACKAGES}
    (out / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")


if __name__ == "__main__":
    main()
