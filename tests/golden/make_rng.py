"""Writes tests/fixtures/rng.json: reference output of torch's CPU generator.

Produced with the project's pinned exporter environment (torch 2.15.0, CPU build used on
x86-64; AVX-512 and AVX2 kernels give the same numbers there):

    .venv/bin/python tests/golden/make_rng.py

Each case seeds `torch.Generator("cpu").manual_seed(seed)` and then calls
`torch.randn(shape, generator=g, dtype=torch.float32)` once per shape in `calls`, in order,
on the same generator. Values are stored as float32 bit patterns (u32) so the Rust test
`tests/it/rng.rs` can assert bit equality. Large tensors keep their first and last 64 values
and an FNV-1a 64 hash over all bit patterns (little-endian u32 words). Never edit the JSON by
hand; rerun this script.
"""

import json
import pathlib

import numpy as np
import torch

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "rng.json"
FULL_LIMIT = 512
EDGE = 64


def fnv1a64(words: np.ndarray) -> str:
    h = 0xCBF29CE484222325
    for b in words.astype("<u4").tobytes():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def record(t: torch.Tensor) -> dict:
    bits = t.contiguous().view(torch.int32).numpy().view(np.uint32).reshape(-1)
    entry = {"shape": list(t.shape), "numel": int(bits.size)}
    if bits.size <= FULL_LIMIT:
        entry["bits"] = [int(x) for x in bits]
    else:
        entry["head"] = [int(x) for x in bits[:EDGE]]
        entry["tail"] = [int(x) for x in bits[-EDGE:]]
        entry["fnv1a64"] = fnv1a64(bits)
    return entry


SEEDS = [0, 1, 42, 2**32 + 7, 18446744073709551557]
SHAPES = [
    (1, 4, 64, 64),
    (2, 4, 8, 8),
    (1, 4, 3, 5),
    (7,),
    (15,),
    (16,),
    (17,),
    (1, 4, 13, 9),
    (1,),
    (2,),
]
SEQUENCES = {
    # A short draw leaves a cached sample that the next short draw returns first; a long draw
    # does not touch the cache.
    "short_then_long": [(3,), (20,), (3,), (1,), (5,)],
    # txt2img with a 4-step TCD schedule at eta > 0: latents, then one noise tensor per step
    # except the last.
    "tcd_run_4_steps": [(1, 4, 16, 16), (1, 4, 16, 16), (1, 4, 16, 16), (1, 4, 16, 16)],
    "mixed_tails": [(33,), (31,), (1, 4, 3, 5), (48,), (9,)],
}


def main() -> None:
    cases = []
    for seed in SEEDS:
        for shape in SHAPES:
            g = torch.Generator("cpu").manual_seed(seed)
            t = torch.randn(shape, generator=g, dtype=torch.float32)
            name = f"seed{seed}_{'x'.join(map(str, shape))}"
            cases.append({"name": name, "seed": seed, "calls": [record(t)]})
    for seed in (0, 42, 2**32 + 7):
        for name, calls in SEQUENCES.items():
            g = torch.Generator("cpu").manual_seed(seed)
            out = [record(torch.randn(s, generator=g, dtype=torch.float32)) for s in calls]
            cases.append({"name": f"seed{seed}_{name}", "seed": seed, "calls": out})
    # torch.rand for the uniform helper.
    g = torch.Generator("cpu").manual_seed(7)
    rand = record(torch.rand((5, 7), generator=g, dtype=torch.float32))
    doc = {
        "generator": f"tests/golden/make_rng.py, torch {torch.__version__}, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}",
        "randn": cases,
        "rand": {"seed": 7, "calls": [rand]},
    }
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(cases)} cases)")


if __name__ == "__main__":
    main()
