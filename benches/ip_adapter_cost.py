"""What an IP-Adapter costs per UNet step and per generation, beside diffusers, on full-size
random-weight SD1.5 (real shapes from `export/configs/sd15`) on the CPU.

Per UNet step (512x512, batch 1, fp32), interleaved round by round (A B C D E A B C D E ...),
medians reported:

* `onnx, no IP inputs`: the UNet exported without the IP-Adapter branch
  (`export_unet(..., ip_adapter=False)`), what every export was before;
* `onnx, no adapter`: the UNet as `python -m export convert` writes it, fed what the engine feeds
  without an adapter (one zero token per layer, scale 0);
* `onnx, plain adapter`: the same graph with 4 image tokens per layer (h94's plain SD1.5
  adapter) at scale 0.5;
* `diffusers, no adapter` / `diffusers, plain adapter`: diffusers' UNet with `AttnProcessor2_0`,
  then with `IPAdapterAttnProcessor2_0` on every cross-attention layer (random `to_k_ip` /
  `to_v_ip`, 4 tokens, scale 0.5), in torch on the same threads.

Per generation: the CLIP ViT-H/14 image encoder (h94's `models/image_encoder`: 32 layers, width
1280, 224x224, projection 1024; random weights) through onnxruntime as `python -m export
ip-adapter` exports it, beside transformers' `CLIPVisionModelWithProjection` in torch.

    .venv/bin/python benches/ip_adapter_cost.py --workdir /work/ip-bench [--rounds 5]

The graphs are written under WORKDIR (about 7 GB) and kept for later runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.ip_adapter import ImageEncoderGraph  # noqa: E402
from export.onnx_io import Io, export_component  # noqa: E402
from export.unet import (  # noqa: E402
    IP_KEY,
    IP_SCALE,
    IP_VALUE,
    export_unet,
    ip_adapter_inputs,
    ip_layer_dims,
    residual_inputs,
)

VIT_H = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 16,
    "num_hidden_layers": 32,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}


def session(path: pathlib.Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def build_unet():
    from diffusers import UNet2DConditionModel

    config = json.loads((ROOT / "export/configs/sd15/unet.json").read_text(encoding="utf-8"))
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(config).eval()


def export_unets(unet, workdir: pathlib.Path) -> dict[str, pathlib.Path]:
    paths = {"with": workdir / "unet_ip", "without": workdir / "unet_no_ip"}
    for name, path in paths.items():
        if not (path / "model.onnx").exists():
            print(f"exporting the UNet ({name} IP inputs) to {path}", flush=True)
            export_unet(unet, path, 18, ip_adapter=name == "with")
    return paths


def ip_processors(unet, tokens: torch.Tensor, scale: float, generator: torch.Generator):
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    procs, width = {}, unet.config.cross_attention_dim
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = AttnProcessor2_0()
            continue
        dim = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        proc = IPAdapterAttnProcessor2_0(dim, width, scale=scale, num_tokens=[tokens.shape[1]])
        with torch.no_grad():
            for linear in (proc.to_k_ip[0], proc.to_v_ip[0]):
                linear.weight.copy_(torch.randn(dim, width, generator=generator) * 0.02)
        procs[name] = proc
    return procs


def unet_rounds(unet, paths, rounds: int) -> dict[str, list[float]]:
    from diffusers.models.attention_processor import AttnProcessor2_0

    g = torch.Generator().manual_seed(0)
    b, h, w = 1, 64, 64
    base = {
        "sample": torch.randn(b, 4, h, w, generator=g),
        "timestep": torch.tensor([999.0]),
        "encoder_hidden_states": torch.randn(b, 77, 768, generator=g),
    }
    base.update(residual_inputs(unet.config, b, h, w))
    plain_feeds = {k: v.numpy() for k, v in base.items()}
    zero_feeds = {**plain_feeds, **{k: v.numpy() for k, v in ip_adapter_inputs(unet, b).items()}}
    adapter_feeds = dict(zero_feeds)
    dims = ip_layer_dims(unet)
    for i, dim in enumerate(dims):
        for key in (IP_KEY, IP_VALUE):
            adapter_feeds[key.format(i)] = torch.randn(b, 4, dim, generator=g).numpy()
    adapter_feeds[IP_SCALE] = np.full(len(dims), 0.5, dtype=np.float32)
    without = session(paths["without"] / "model.onnx")
    with_ip = session(paths["with"] / "model.onnx")
    tokens = torch.randn(b, 4, 768, generator=g)
    adapter_procs = ip_processors(unet, tokens, 0.5, g)
    args = (base["sample"], base["timestep"], base["encoder_hidden_states"])

    def diffusers_step(procs, ehs):
        # set_attn_processor empties a dict it is given.
        unet.set_attn_processor(dict(procs) if isinstance(procs, dict) else procs)
        with torch.no_grad():
            unet(args[0], args[1], ehs)

    contenders = {
        "onnx, no IP inputs": lambda: without.run(["out_sample"], plain_feeds),
        "onnx, no adapter": lambda: with_ip.run(["out_sample"], zero_feeds),
        "onnx, plain adapter (4 tokens, scale 0.5)": lambda: with_ip.run(
            ["out_sample"], adapter_feeds
        ),
        "diffusers, no adapter": lambda: diffusers_step(AttnProcessor2_0(), args[2]),
        "diffusers, plain adapter (4 tokens, scale 0.5)": lambda: diffusers_step(
            adapter_procs, (args[2], [tokens])
        ),
    }
    for fn in contenders.values():  # warm-up: arenas, first-run allocations
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        for name, fn in contenders.items():
            times[name].append(timed(fn))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{v[-1]:.2f}" for v in times.values()))
    return times


def encoder_rounds(workdir: pathlib.Path, rounds: int) -> dict[str, list[float]]:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H)).eval()
    path = workdir / "image_encoder"
    pixels = torch.randn(1, 3, 224, 224)
    if not (path / "model.onnx").exists():
        print(f"exporting the ViT-H image encoder to {path}", flush=True)
        export_component(
            ImageEncoderGraph(encoder, "plain"),
            (pixels,),
            [Io("pixel_values", {0: "batch"})],
            [Io("image_embeds", {0: "batch"})],
            path,
            18,
            prefix="model.",
        )
    sess = session(path / "model.onnx")
    feeds = {"pixel_values": pixels.numpy()}

    def torch_encode():
        with torch.no_grad():
            encoder(pixels)

    contenders = {
        "onnx image encoder": lambda: sess.run(["image_embeds"], feeds),
        "transformers image encoder": torch_encode,
    }
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(timed(fn))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=pathlib.Path, required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=pathlib.Path, help="also write the raw times here")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())
    unet = build_unet()
    paths = export_unets(unet, args.workdir)
    times = unet_rounds(unet, paths, args.rounds)
    del unet
    times.update(encoder_rounds(args.workdir, args.rounds))
    base = statistics.median(times["onnx, no IP inputs"])
    print(f"\nmedians of {args.rounds} interleaved rounds (seconds)")
    print("| contender | median s | vs onnx without IP inputs |")
    print("|---|---|---|")
    for name, values in times.items():
        m = statistics.median(values)
        ratio = f"{m / base:.3f}x" if "image encoder" not in name else "(once per generation)"
        print(f"| {name} | {m:.3f} | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps(times, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
