"""Test tokenizer files in the released model's format, built offline from o200k_base.

The released Phi-4-mini-flash tokenizer is o200k_base's byte-level vocabulary (ids 0..199997) plus
the added tokens of spec 6.2. ``o200k_base.tiktoken.gz`` ships in the PyPI package ``bpe-openai``;
from its ranks we write what Hugging Face would ship: ``tokenizer.json`` (vocabulary through GPT-2's
byte-to-unicode map, merges recovered from the ranks) or ``vocab.json`` + ``merges.txt``.
"""

from __future__ import annotations

import base64
import gzip
import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path

from phiflash_mlx.tokenizer import O200K_PATTERN, PHI_ADDED_TOKENS, PHI_CHAT_TEMPLATE, bytes_to_unicode

# Bump when the files written below change, so cached copies are rebuilt.
FORMAT_VERSION = "1"


def o200k_ranks() -> dict[bytes, int]:
    """o200k_base's mergeable ranks (token bytes -> rank), read offline from bpe-openai."""
    blob = importlib.resources.files("bpe_openai") / "data" / "o200k_base.tiktoken.gz"
    lines = gzip.decompress(blob.read_bytes()).splitlines()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}


def _split(token: bytes, rank: int, ranks: dict[bytes, int]) -> list[bytes]:
    """BPE of ``token``'s own bytes using only merges ranked below it.

    For a reachable token this ends in two parts: the pair whose merge makes it.
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """Byte-level vocabulary and the merge list sorted by the id of the merged token."""
    to_text = bytes_to_unicode()
    text = {token: "".join(to_text[b] for b in token) for token in ranks}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = _split(token, rank, ranks)
            if len(parts) == 2:
                merges.append(f"{text[parts[0]]} {text[parts[1]]}")
    return {text[t]: r for t, r in ranks.items()}, merges


def _added_token_entries() -> list[dict]:
    return [
        {
            "id": t.id,
            "content": t.content,
            "single_word": False,
            "lstrip": False,
            "rstrip": t.rstrip,
            "normalized": False,
            "special": t.special,
        }
        for t in sorted(PHI_ADDED_TOKENS.values(), key=lambda t: t.id)
    ]


def tokenizer_json(vocab: dict[str, int], merges: list[str]) -> dict:
    """A ``tokenizer.json`` shaped like Hugging Face's GPT-4o-style byte-level BPE files."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added_token_entries(),
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            # Like Hugging Face's files, the model vocabulary lists the added tokens too.
            "vocab": {**vocab, **{t.content: t.id for t in PHI_ADDED_TOKENS.values()}},
            "merges": merges,
        },
    }


def tokenizer_config() -> dict:
    """``tokenizer_config.json`` as described in spec 6.1-6.3."""
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in _added_token_entries()
        },
        "bos_token": "<|endoftext|>",
        "chat_template": PHI_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 65536,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": "<|endoftext|>",
    }


GENERATION_CONFIG = {"bos_token_id": 199999, "eos_token_id": [200020, 199999], "pad_token_id": 199999}


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def build_phi_tokenizer_dirs(cache: Path) -> tuple[Path, Path]:
    """Two checkpoint-like directories under ``cache``, built once and reused afterwards.

    ``json`` has tokenizer.json; ``vocab`` has vocab.json + merges.txt + added_tokens.json, with
    vocab.json's chat-token ids shifted as in the released files (spec 6.2 quirk). Both have
    tokenizer_config.json and generation_config.json. The files are written to a private folder
    and renamed into place, so concurrent test runs never read a half-written file.
    """
    root = cache / f"phi-o200k-v{FORMAT_VERSION}"
    if not root.is_dir():
        work = Path(tempfile.mkdtemp(dir=cache, prefix="building-"))
        _write_phi_tokenizer_dirs(work)
        try:
            os.replace(work, root)
        except OSError:  # another run got there first
            shutil.rmtree(work, ignore_errors=True)
    return root / "json", root / "vocab"


def _write_phi_tokenizer_dirs(root: Path) -> None:
    json_dir, vocab_dir = root / "json", root / "vocab"
    vocab, merges = vocab_and_merges(o200k_ranks())
    for directory in (json_dir, vocab_dir):
        directory.mkdir(parents=True)
        _write_json(directory / "tokenizer_config.json", tokenizer_config())
        _write_json(directory / "generation_config.json", GENERATION_CONFIG)
    _write_json(json_dir / "tokenizer.json", tokenizer_json(vocab, merges))
    stale = dict(vocab)
    stale.update({"<|endoftext|>": 199999, "<|endofprompt|>": 200018, "<|assistant|>": 200019, "<|end|>": 200020})
    for shift, name in enumerate(["<|user|>", "<|system|>", "<|tool|>", "<|/tool|>", "<|tool_call|>",
                                  "<|/tool_call|>", "<|tool_response|>", "<|tag|>"]):
        stale[name] = 200022 + shift
    _write_json(vocab_dir / "vocab.json", stale)
    (vocab_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    _write_json(vocab_dir / "added_tokens.json", {t.content: t.id for t in PHI_ADDED_TOKENS.values()})
