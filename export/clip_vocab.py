"""Write a real CLIP tokenizer directory without the Hugging Face hub.

Stable Diffusion's text encoders all use OpenAI CLIP's byte-level BPE (49408 tokens). The
vocabulary ships in the ``open_clip_torch`` wheel as ``open_clip/bpe_simple_vocab_16e6.txt.gz``;
this module fetches that wheel from PyPI with pip (once, cached), rebuilds the vocabulary and
merges exactly as ``clip/simple_tokenizer.py`` does, and saves a ``transformers.CLIPTokenizer``
in ``save_pretrained`` layout next to the classic ``vocab.json`` / ``merges.txt`` pair.

SD1.5 and SD2.1's ``tokenizer`` pad with ``<|endoftext|>``; SDXL's ``tokenizer_2`` pads with
``!`` (id 0)::

    python -m export.clip_vocab OUT_DIR [--pad-token '!'] [--model-max-length 77]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

OPEN_CLIP_VERSION = "3.3.0"
VOCAB_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# sha256 of bpe_simple_vocab_16e6.txt.gz as shipped by OpenAI CLIP and open_clip.
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# CLIP keeps the first 49152 - 256 - 2 merges of the 16e6 file (the first line is a header).
N_MERGES = 49152 - 256 - 2


def cache_dir() -> pathlib.Path:
    """Where the downloaded vocabulary is kept: ``$TCD_ORT_CACHE`` or ``~/.cache/tcd-ort``."""
    env = os.environ.get("TCD_ORT_CACHE")
    if env:
        return pathlib.Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"
    return base / "tcd-ort"


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bpe_vocab_path() -> pathlib.Path:
    """Return the cached ``bpe_simple_vocab_16e6.txt.gz``, downloading open_clip_torch if needed."""
    target = cache_dir() / "bpe_simple_vocab_16e6.txt.gz"
    if target.is_file() and _sha256(target) == VOCAB_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            f"open_clip_torch=={OPEN_CLIP_VERSION}",
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(pathlib.Path(tmp).glob("open_clip_torch-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                "could not download the CLIP BPE vocabulary: `"
                + " ".join(cmd)
                + f"` failed:\n{proc.stderr.strip()}\n"
                f"Put bpe_simple_vocab_16e6.txt.gz (from the open_clip_torch wheel) at {target} "
                "or set TCD_ORT_CACHE to a directory holding it."
            )
        with zipfile.ZipFile(wheels[0]) as whl:
            data = whl.read(VOCAB_MEMBER)
    if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
        raise RuntimeError(
            f"{VOCAB_MEMBER} in open_clip_torch=={OPEN_CLIP_VERSION} has an unexpected sha256; "
            "refusing to build a tokenizer from it"
        )
    # Fixture scripts run side by side may fetch it at the same time: each writes its own file
    # and renames it into place (atomic, and every copy has the same verified bytes).
    partial = target.with_suffix(f".{os.getpid()}.partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The 49408-entry vocabulary and 48894 merges of OpenAI CLIP's ``SimpleTokenizer``."""
    with gzip.open(bpe_vocab_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m) for m in merges)
    vocab.extend([BOS, EOS])
    encoder = {tok: i for i, tok in enumerate(vocab)}
    if len(encoder) != 49408:
        raise RuntimeError(f"CLIP vocabulary has {len(encoder)} entries, expected 49408")
    return encoder, merges


def write_vocab_files(out_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``vocab.json`` and ``merges.txt`` as transformers' slow ``CLIPTokenizer`` saved
    them."""
    encoder, merges = clip_vocab_and_merges()
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab.json"
    merges_file = out_dir / "merges.txt"
    vocab_file.write_text(
        json.dumps(encoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    merges_file.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return vocab_file, merges_file


def write_clip_tokenizer(
    out_dir: pathlib.Path, pad_token: str = EOS, model_max_length: int = 77
) -> None:
    """Write a CLIP tokenizer to ``out_dir`` in ``save_pretrained`` layout.

    Files: ``vocab.json``, ``merges.txt``, ``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``. ``pad_token`` is ``<|endoftext|>`` for SD1.5/SD2.1's
    ``tokenizer`` and ``!`` for SDXL's ``tokenizer_2``.
    """
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    out_dir = pathlib.Path(out_dir)
    vocab_file, merges_file = write_vocab_files(out_dir)
    # transformers 5 builds CLIPTokenizer from the files through its tokenizers backend; the
    # keyword names differ between major versions, so go through from_pretrained-style kwargs.
    tok = CLIPTokenizer(
        vocab_file=str(vocab_file),
        merges_file=str(merges_file),
        vocab=str(vocab_file),
        merges=str(merges_file),
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
    tok.save_pretrained(str(out_dir))
    fast = CLIPTokenizerFast.from_pretrained(str(out_dir))
    fast.save_pretrained(str(out_dir))
    # save_pretrained may rewrite or drop the classic pair; keep the canonical bytes.
    write_vocab_files(out_dir)
    special = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": pad_token,
        "unk_token": EOS,
    }
    smap = out_dir / "special_tokens_map.json"
    if not smap.is_file():
        smap.write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """CLI entry: ``python -m export.clip_vocab OUT_DIR [--pad-token T]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument(
        "--pad-token", default=EOS, help="'<|endoftext|>' (SD1.5/2.1) or '!' (SDXL tokenizer_2)"
    )
    parser.add_argument("--model-max-length", type=int, default=77)
    args = parser.parse_args(argv)
    write_clip_tokenizer(
        args.out_dir, pad_token=args.pad_token, model_max_length=args.model_max_length
    )
    print(f"wrote CLIP tokenizer to {args.out_dir}")


if __name__ == "__main__":
    main()
