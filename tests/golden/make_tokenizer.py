"""Golden CLIP token ids for tests/it/tokenizer.rs, from transformers' CLIPTokenizer.

Run from the repository root with the pinned exporter environment (export/requirements.txt):

    .venv/bin/python tests/golden/make_tokenizer.py

Writes
  tests/fixtures/clip-tokenizer/sd15/     vocab.json, merges.txt, tokenizer.json (compact),
                                          tokenizer_config.json, special_tokens_map.json
                                          (pad `<|endoftext|>`, SD1.5/SD2.1 `tokenizer`)
  tests/fixtures/clip-tokenizer/sdxl_2/   tokenizer_config.json, special_tokens_map.json only
                                          (pad `!`, SDXL `tokenizer_2`); the tests pair them with
                                          sd15's vocabulary files, which are identical
  tests/fixtures/tokenizer.json           ids for every case, per pad variant

Findings recorded here (transformers 5.23.0, tokenizers 0.23.3, diffusers 0.42.1):
* diffusers loads `["transformers", "CLIPTokenizer"]` from model_index.json. In transformers 5
  there is no slow (Python) CLIP tokenizer any more: `CLIPTokenizer` is the tokenizers-backed
  class and `CLIPTokenizerFast` is an alias of it. Loading from tokenizer.json, from
  vocab.json + merges.txt only (optimum-cli's layout) and through the Fast name gives identical
  ids for every case below; the script asserts it.
* transformers 5 does not run ftfy or html.unescape (transformers 4's slow tokenizer did, and so
  does OpenAI's SimpleTokenizer): `&amp;` is tokenized as `&`, `amp`, `;`. The Rust side matches
  transformers 5, which is what diffusers 0.42 runs; `openai_differs` lists the cases where
  OpenAI's reference (html.unescape + whitespace clean, without ftfy) would give other ids.
* Special tokens are matched in the raw text: `<|endoftext|>` typed in a prompt becomes id 49407,
  and with pad `!` (SDXL tokenizer_2) every `!` becomes id 0 instead of BPE's `!</w>` (256).
"""

from __future__ import annotations

import html
import json
import pathlib
import re
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from export.clip_vocab import write_clip_tokenizer  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
OUT_DIR = FIXTURES / "clip-tokenizer"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")

SEED_PROMPT = (
    "Painting of the orange cat Otto von Garfield, Count of Bismarck-Schönhausen, Duke of "
    "Lauenburg, Minister-President of Prussia. Depicted wearing a Prussian Pickelhaube and eating "
    "his favorite meal - lasagna."
)

CASES: list[tuple[str, str]] = [
    ("plain", "a photo of a cat"),
    ("plain_sd", "A cinematic shot of a baby racoon wearing an intricate italian priest robe."),
    ("seed_prompt_truncated", SEED_PROMPT),
    ("seed_prompt_twice", SEED_PROMPT + " " + SEED_PROMPT),
    ("empty", ""),
    ("only_space", "   "),
    ("accents", "café naïve résumé Schönhausen Ærø"),
    ("decomposed_accents", "cafe\u0301 nai\u0308ve"),
    ("combining_marks", "Z\u0351\u036b\u0343a\u0310\u0313lgo"),
    ("cjk", "東京の猫 一只猫 고양이"),
    ("emoji", "a 🐱 cat 👍🏽 with 👨‍👩‍👧 family 🇩🇪"),
    ("arabic", "قطة برتقالية جميلة"),
    ("hebrew_devanagari", "חתול बिल्ली"),
    ("whitespace", "  a\tcat \n\n on   a\r\nmat\u00a0and\u2003more  "),
    ("uppercase", "A PHOTO OF A CAT IN NEW YORK"),
    ("punctuation_runs", "wow!!! really?!?... (yes) [no] {maybe} -- ~~ ** ## @@ $$ %%"),
    ("numbers", "1234567 3.14159 1,000,000 2nd 4k 8K"),
    ("apostrophes", "it's don't they're we've i'm you'll he'd 'quoted' rock'n'roll"),
    ("apostrophes_upper", "IT'S DON'T THEY'RE WE'VE I'M YOU'LL HE'D"),
    ("curly_quotes", "it\u2019s \u201cquoted\u201d"),
    ("html_entities", "tom &amp; jerry &lt;3 &quot;hi&quot; &#39;x&#39; &nbsp;"),
    ("endoftext_literal", "a cat<|endoftext|>a dog"),
    ("startoftext_literal", "<|startoftext|>hello<|endoftext|>"),
    ("endoftext_upper", "a cat <|ENDOFTEXT|> dog"),
    ("bang", "hello! wow!! !"),
    ("weights_syntax", "(masterpiece:1.2), best quality, [ugly], <lora:foo:0.8>"),
    (
        "long_word",
        "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    ),
    ("mixed_script_word", "catκάτ猫cat123abc"),
    ("control_chars", "a\u0000b\u0007c\u200bd\ufeffe"),
    ("url", "https://example.com/a_b-c?d=e&f=g#h"),
    ("tokens_75", " ".join(["cat"] * 73)),
    ("tokens_76", " ".join(["cat"] * 74)),
    ("tokens_77", " ".join(["cat"] * 75)),
    ("tokens_78", " ".join(["cat"] * 76)),
    ("tokens_78_bang", " ".join(["cat"] * 75) + " !"),
]


def openai_clean(text: str) -> str:
    """OpenAI SimpleTokenizer's basic_clean (without ftfy) + whitespace_clean + lower."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def encode_all(tok) -> dict[str, dict]:
    out = {}
    n = tok.model_max_length
    for name, text in CASES:
        ids = tok(text, padding="max_length", max_length=n, truncation=True).input_ids
        untruncated = tok(text, padding="longest").input_ids
        removed = None
        if len(untruncated) >= len(ids) and untruncated != ids:
            # diffusers' encode_prompt builds its truncation warning exactly like this.
            removed = tok.batch_decode([untruncated[n - 1 : -1]])[0]
        out[name] = {"ids": ids, "untruncated_len": len(untruncated), "truncated_text": removed}
    return out


def main() -> None:
    import diffusers
    import tokenizers
    import transformers
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    shutil.rmtree(OUT_DIR, ignore_errors=True)
    variants = {"sd15": "<|endoftext|>", "sdxl_2": "!"}
    result: dict = {
        "source": (
            f"tests/golden/make_tokenizer.py with transformers {transformers.__version__}, "
            f"tokenizers {tokenizers.__version__}, diffusers {diffusers.__version__}"
        ),
        "clip_tokenizer_is_fast": CLIPTokenizer is CLIPTokenizerFast,
        "cases": {name: text for name, text in CASES},
        "variants": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for variant, pad in variants.items():
            full = tmp / variant / "full"
            write_clip_tokenizer(full, pad_token=pad)
            vocab_only = tmp / variant / "vocab_only"
            json_only = tmp / variant / "json_only"
            vocab_only.mkdir()
            json_only.mkdir()
            for f in ("vocab.json", "merges.txt") + CONFIG_FILES:
                shutil.copy(full / f, vocab_only / f)
            for f in ("tokenizer.json",) + CONFIG_FILES:
                shutil.copy(full / f, json_only / f)

            loaded = {
                "slow_name_full": CLIPTokenizer.from_pretrained(str(full)),
                "slow_name_vocab_merges": CLIPTokenizer.from_pretrained(str(vocab_only)),
                "slow_name_tokenizer_json": CLIPTokenizer.from_pretrained(str(json_only)),
                "fast_name_full": CLIPTokenizerFast.from_pretrained(str(full)),
                "fast_name_vocab_merges": CLIPTokenizerFast.from_pretrained(str(vocab_only)),
            }
            encoded = {k: encode_all(t) for k, t in loaded.items()}
            reference = encoded["slow_name_full"]
            for k, e in encoded.items():
                for name, _ in CASES:
                    if e[name]["ids"] != reference[name]["ids"]:
                        raise SystemExit(f"{variant}: {k} differs from slow_name_full on {name!r}")

            tok = loaded["slow_name_full"]
            openai_differs = []
            for name, text in CASES:
                cleaned = tok(openai_clean(text), padding="max_length", truncation=True).input_ids
                if cleaned != reference[name]["ids"]:
                    openai_differs.append(name)

            result["variants"][variant] = {
                "dir": f"tests/fixtures/clip-tokenizer/{variant}",
                "pad_token": pad,
                "pad_id": tok.pad_token_id,
                "bos_id": tok.bos_token_id,
                "eos_id": tok.eos_token_id,
                "max_length": tok.model_max_length,
                "loaders_agree": sorted(encoded),
                "openai_differs": openai_differs,
                "encodings": reference,
            }

            dest = OUT_DIR / variant
            dest.mkdir(parents=True)
            for f in CONFIG_FILES:
                shutil.copy(full / f, dest / f)
            if variant == "sd15":
                shutil.copy(full / "vocab.json", dest / "vocab.json")
                shutil.copy(full / "merges.txt", dest / "merges.txt")
                data = json.loads((full / "tokenizer.json").read_text(encoding="utf-8"))
                (dest / "tokenizer.json").write_text(
                    json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
                )
            else:
                for f in ("vocab.json", "merges.txt"):
                    if (full / f).read_bytes() != (OUT_DIR / "sd15" / f).read_bytes():
                        raise SystemExit(f"{f} differs between pad variants")

    (FIXTURES / "tokenizer.json").write_text(
        json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    print(f"wrote {OUT_DIR} and {FIXTURES / 'tokenizer.json'}")


if __name__ == "__main__":
    main()
