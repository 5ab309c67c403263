"""Tokenizers and the chat format of Phi-4-mini-flash-reasoning (spec Section 6).

Two back-ends sit behind one :class:`Tokenizer` interface (names as in transformers / mlx-lm):

* **byte-level BPE** (the released model): the Hugging Face ``tokenizer.json`` (or ``vocab.json`` +
  ``merges.txt``) is converted into a ``tiktoken.Encoding``. The o200k-derived vocabulary is a GPT-2
  byte-level BPE whose merge list is ordered like the token ids, so BPE by rank (tiktoken) gives the
  same tokens as BPE by merge priority (Hugging Face); the loader checks that ordering.
* **sentencepiece** (``tokenizer.model``, used by small demo models): chat tokens are user-defined
  pieces. Such a checkpoint also ships the equivalent Hugging Face ``tokenizer.json``
  (:func:`sentencepiece_tokenizer_json` writes it: the model's own normalizer, BPE merges ranked
  by piece score, byte fallback), so transformers and
  mlx-lm tokenize exactly as sentencepiece does. A sentencepiece-style ``tokenizer.json`` without
  ``tokenizer.model`` beside it (what ``mlx_lm.convert`` writes back) is read with Hugging Face
  ``tokenizers`` itself.

Added tokens (spec 6.2) are handled here, not by the back-ends, the way Hugging Face ``tokenizers``
does it: they are matched in text only when the caller allows it, and ``rstrip`` tokens absorb the
whitespace that follows them. Plain ``encode(text)`` never turns the text ``<|end|>`` into id 200020.

The chat template of spec 6.3 is implemented in Python (:func:`render_phi_chat`); a checkpoint that
ships a different template is rendered with jinja2.
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import PhiflashError

__all__ = [
    "AddedToken",
    "PHI_ADDED_TOKENS",
    "PHI_CHAT_TEMPLATE",
    "StreamingDetokenizer",
    "Tokenizer",
    "TokenizerError",
    "bytes_to_unicode",
    "load_tokenizer",
    "render_phi_chat",
    "sentencepiece_tokenizer_json",
]


class TokenizerError(PhiflashError):
    """A tokenizer file is missing, unreadable or of a kind this project cannot use."""


# ---------------------------------------------------------------------------------------------
# Facts from the spec
# ---------------------------------------------------------------------------------------------

# Spec 6.3, verbatim (``tokenizer_config.json`` ``chat_template``).
PHI_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + "
    "'<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + "
    "message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if "
    "add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class AddedToken:
    """A token matched as a whole in template text (``added_tokens`` of ``tokenizer.json``)."""

    content: str
    id: int
    special: bool = True  # removed by ``decode(skip_special_tokens=True)``
    rstrip: bool = False  # absorbs the whitespace after it when encoding
    lstrip: bool = False  # absorbs the whitespace before it when encoding


# Spec 6.2: the released model's added tokens (content -> id, special, rstrip).
PHI_ADDED_TOKENS: dict[str, AddedToken] = {
    t.content: t
    for t in (
        AddedToken("<|endoftext|>", 199999, special=True, rstrip=False),
        AddedToken("<|endofprompt|>", 200018, special=True, rstrip=False),
        AddedToken("<|assistant|>", 200019, special=True, rstrip=True),
        AddedToken("<|end|>", 200020, special=True, rstrip=True),
        AddedToken("<|user|>", 200021, special=True, rstrip=True),
        AddedToken("<|system|>", 200022, special=True, rstrip=True),
        AddedToken("<|tool|>", 200023, special=False, rstrip=True),
        AddedToken("<|/tool|>", 200024, special=False, rstrip=True),
        AddedToken("<|tool_call|>", 200025, special=False, rstrip=True),
        AddedToken("<|/tool_call|>", 200026, special=False, rstrip=True),
        AddedToken("<|tool_response|>", 200027, special=False, rstrip=True),
        AddedToken("<|tag|>", 200028, special=True, rstrip=True),
    )
}

# Regular byte-level tokens of the o200k-derived vocabulary (ids 0..199997, spec 6.1).
_PHI_REGULAR_VOCAB = 199998
_SURROGATE = re.compile("[\ud800-\udfff]")

# Pre-tokenizer regexes. O200K is the one of the Phi-4 family (spec 6.1); GPT2 is what a plain
# ByteLevel pre-tokenizer with ``use_regex`` uses.
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# What Hugging Face ``tokenizers`` strips for rstrip/lstrip: Rust's ``char::is_whitespace`` (the
# Unicode White_Space property). Python's ``str.isspace`` also accepts U+001C..U+001F, so it is
# not used.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + (
    "\u2028\u2029\u202f\u205f\u3000"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards in byte
    order (so space, 0x20, is ``Ġ`` and newline is ``Ċ``).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# ---------------------------------------------------------------------------------------------
# Chat template (spec 6.3)
# ---------------------------------------------------------------------------------------------


def _phi_chat_parts(
    messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, eos_token: str
) -> list[tuple[str, bool]]:
    """The Phi template as (text, from_template) pieces.

    Template text may contain added tokens; message content and tools are plain text, so
    ``<|end|>`` typed by a user stays text.
    """
    parts: list[tuple[str, bool]] = []
    for n, message in enumerate(messages):
        try:
            role, content = message["role"], message["content"]
        except (KeyError, TypeError) as exc:
            raise PhiflashError(
                f"chat message {n} must be a mapping with 'role' and 'content' (got {message!r})"
            ) from exc
        if not isinstance(role, str) or not isinstance(content, str):
            raise PhiflashError(
                f"chat message {n}: 'role' and 'content' must be strings "
                f"(got {type(role).__name__} and {type(content).__name__})"
            )
        parts += [(f"<|{role}|>", True), (content, False)]
        tools = message.get("tools") if role == "system" and "tools" in message else None
        if tools is not None:
            if not isinstance(tools, str):  # the template concatenates strings only
                tools = json.dumps(tools, ensure_ascii=False)
            parts += [("<|tool|>", True), (tools, False), ("<|/tool|>", True)]
        parts.append(("<|end|>", True))
    parts.append(("<|assistant|>" if add_generation_prompt else eos_token, True))
    return parts


def render_phi_chat(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    eos_token: str = "<|endoftext|>",
) -> str:
    """The string spec 6.3's template renders, e.g. ``<|user|>Hi<|end|><|assistant|>``.

    A system message may carry ``tools`` (a JSON string; lists and dicts are serialised with
    ``json.dumps``), rendered as ``<|system|>…<|tool|>tools<|/tool|><|end|>``.
    """
    return "".join(text for text, _ in _phi_chat_parts(messages, add_generation_prompt, eos_token))


def _render_jinja(template: str, messages, add_generation_prompt: bool, **variables) -> str:
    """Render a checkpoint's own chat template the way transformers does."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:
        raise TokenizerError(
            "this checkpoint's chat template is not the Phi-4 one, and rendering it needs jinja2: "
            "pip install jinja2"
        ) from exc

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
    except TemplateError as exc:
        raise PhiflashError(f"the checkpoint's chat template failed: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Back-ends: each encodes plain text (no added tokens) and knows the bytes of its regular ids
# ---------------------------------------------------------------------------------------------


class _BPEBackend:
    """Byte-level BPE through tiktoken. ``ranks`` maps token bytes to ids (= BPE ranks)."""

    def __init__(self, ranks: dict[bytes, int], specials: dict[str, int], pattern: str, name: str):
        import tiktoken

        try:
            self.encoding = tiktoken.Encoding(
                name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
            )
        except Exception as exc:  # tiktoken reports bad ranks/regexes with assorted errors
            raise TokenizerError(f"{name}: tiktoken cannot build this tokenizer: {exc}") from exc
        size = max(ranks.values()) + 1
        self.token_bytes: list[bytes | None] = [None] * size
        for token, rank in ranks.items():
            self.token_bytes[rank] = token
        self.dummy_prefix = False

    def encode_plain(self, text: str, at_start: bool) -> list[int]:
        return self.encoding.encode_ordinary(text)


def _proto_fields(buf: bytes):
    """Top-level fields of a protobuf message: (field number, wire type, value)."""
    pos, end = 0, len(buf)

    def varint():
        nonlocal pos
        shift = value = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    while pos < end:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n = varint()
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


# sentencepiece ModelProto.SentencePiece.Type
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


class _SentencePieceBackend:
    """A sentencepiece model. Piece types and ``add_dummy_prefix`` are read from the model proto."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        try:
            proto = path.read_bytes()
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
            types, self.dummy_prefix = [], True
            for field, _, value in _proto_fields(proto):
                if field == 1:  # repeated SentencePiece pieces
                    kind = _SP_NORMAL
                    for f, _, v in _proto_fields(value):
                        if f == 3:
                            kind = v
                    types.append(kind)
                elif field == 3:  # NormalizerSpec
                    for f, _, v in _proto_fields(value):
                        if f == 3:
                            self.dummy_prefix = bool(v)
        except Exception as exc:
            raise TokenizerError(
                f"{path}: not a readable sentencepiece model ({exc}); re-download or re-export it"
            ) from exc
        if not types:
            raise TokenizerError(f"{path} is empty or holds no pieces; re-download the tokenizer files")
        if len(types) != self.sp.get_piece_size():
            raise TokenizerError(f"{path}: the piece table could not be read")
        self.types = types
        # Text that does not start the input gets no dummy prefix: the same model with
        # add_dummy_prefix switched off (a second NormalizerSpec with field 3 = 0 merges into the
        # first, as protobuf merges repeated message fields).
        self.sp_inner = (
            spm.SentencePieceProcessor(model_proto=proto + b"\x1a\x02\x18\x00")
            if self.dummy_prefix
            else self.sp
        )
        self.token_bytes = []
        for i, kind in enumerate(types):
            piece = self.sp.id_to_piece(i)
            if kind == _SP_BYTE:
                self.token_bytes.append(bytes([int(piece[3:5], 16)]))
            elif kind == _SP_UNKNOWN:
                self.token_bytes.append(" \u2047 ".encode())  # sentencepiece's unknown surface
            elif kind in (_SP_CONTROL, _SP_UNUSED):
                self.token_bytes.append(b"")
            else:
                self.token_bytes.append(piece.replace("\u2581", " ").encode())
        self._char_cache: dict[str, list[int]] = {}

    def added_tokens(self) -> list[tuple[str, int, int]]:
        """(content, id, type) of the control and user-defined pieces."""
        return [
            (self.sp.id_to_piece(i), i, kind)
            for i, kind in enumerate(self.types)
            if kind in (_SP_CONTROL, _SP_USER_DEFINED)
        ]

    def encode_plain(self, text: str, at_start: bool) -> list[int]:
        sp = self.sp if at_start else self.sp_inner
        ids = sp.encode(text)
        if not any(self.types[i] == _SP_USER_DEFINED for i in ids):
            return ids
        # sentencepiece always matches user-defined pieces; in plain text they must stay text.
        out: list[int] = []
        for i in ids:
            if self.types[i] == _SP_USER_DEFINED:
                out += self._spell(self.sp.id_to_piece(i))
            else:
                out.append(i)
        return out

    def _spell(self, piece: str) -> list[int]:
        """Ids that spell ``piece`` character by character (byte pieces where there is none)."""
        if piece not in self._char_cache:
            ids: list[int] = []
            for ch in piece.replace(" ", "\u2581"):
                i = self.sp.piece_to_id(ch)
                if self.types[i] == _SP_NORMAL:
                    ids.append(i)
                    continue
                byte_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in ch.encode()]
                if all(self.types[b] == _SP_BYTE for b in byte_ids):
                    ids += byte_ids
                else:
                    ids.append(self.sp.unk_id())
            self._char_cache[piece] = ids
        return self._char_cache[piece]

    def first_bytes(self, i: int) -> bytes:
        """The bytes of id ``i`` when it is the first text of the output (dummy prefix removed)."""
        raw = self.token_bytes[i]
        if self.dummy_prefix and self.types[i] == _SP_NORMAL and raw.startswith(b" "):
            return raw[1:]
        return raw


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class _TokenizersBackend:
    """A sentencepiece-style ``tokenizer.json`` (Metaspace ``▁``, byte fallback) read by Hugging Face
    ``tokenizers`` itself, for checkpoints that ship no ``tokenizer.model`` (``mlx_lm.convert``
    writes only ``tokenizer.json``).

    The added tokens are removed from the file the back-end reads: they are matched here, only
    where allowed, like with the other back-ends. A ``first`` dummy prefix goes only on text that
    starts the input, as Hugging Face does for the pieces between added tokens.
    """

    def __init__(self, data: dict, added: Sequence[AddedToken], path: Path):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as exc:
            raise TokenizerError(
                f"{path}: reading this sentencepiece-style tokenizer.json needs Hugging Face "
                "tokenizers: pip install tokenizers"
            ) from exc
        plain = dict(data, added_tokens=[])
        inner = json.loads(json.dumps(plain))
        changed = _metaspace_without_first_prefix(inner.get("pre_tokenizer"))
        try:
            self.first = HFTokenizer.from_str(json.dumps(plain))
            self.inner = HFTokenizer.from_str(json.dumps(inner)) if changed else self.first
        except Exception as exc:  # tokenizers reports bad files with assorted errors
            raise TokenizerError(
                f"{path}: Hugging Face tokenizers cannot read it ({exc}); re-download or re-convert "
                "the tokenizer files"
            ) from exc
        model = data["model"]
        byte_fallback = bool(model.get("byte_fallback"))
        vocab = model["vocab"]
        self.token_bytes: list[bytes | None] = [None] * (max(vocab.values(), default=-1) + 1)
        for piece, token_id in vocab.items():
            match = _BYTE_PIECE.fullmatch(piece) if byte_fallback else None
            if match:
                self.token_bytes[token_id] = bytes([int(match.group(1), 16)])
            else:
                self.token_bytes[token_id] = piece.replace("\u2581", " ").encode()
        self._vocab = vocab
        self._added_ids = {t.id for t in added}
        # the decoder strips the space a dummy prefix put before the first word
        self.dummy_prefix = '"Strip"' in json.dumps(data.get("decoder"))

    def encode_plain(self, text: str, at_start: bool) -> list[int]:
        ids = (self.first if at_start else self.inner).encode(text, add_special_tokens=False).ids
        if not self._added_ids.intersection(ids):
            return ids
        # merges that rebuild an added token's text: in plain text it stays text
        out: list[int] = []
        for i in ids:
            out += self._spell(i) if i in self._added_ids else [i]
        return out

    def _spell(self, token_id: int) -> list[int]:
        ids: list[int] = []
        for ch in (self.token_bytes[token_id] or b"").decode("utf-8", "replace").replace(" ", "\u2581"):
            if ch in self._vocab and self._vocab[ch] not in self._added_ids:
                ids.append(self._vocab[ch])
            else:
                ids += [self._vocab.get(f"<0x{b:02X}>", 0) for b in ch.encode()]
        return ids

    def first_bytes(self, i: int) -> bytes:
        raw = self.token_bytes[i] or b""
        return raw[1:] if raw.startswith(b" ") else raw


def _metaspace_without_first_prefix(spec: Any) -> bool:
    """Switch a Metaspace ``prepend_scheme: first`` to ``never`` in place; True if one was."""
    if not isinstance(spec, dict):
        return False
    if spec.get("type") == "Sequence":
        return any([_metaspace_without_first_prefix(s) for s in spec.get("pretokenizers", [])])
    if spec.get("type") == "Metaspace" and spec.get("prepend_scheme", "always") == "first":
        spec["prepend_scheme"] = "never"
        return True
    return False


def _is_sentencepiece_json(data: dict) -> bool:
    """A tokenizer.json converted from a sentencepiece BPE model (``▁`` for spaces, byte fallback)."""
    model = data.get("model") or {}
    parts = [data.get("pre_tokenizer"), data.get("normalizer"), data.get("decoder")]
    shape = json.dumps(parts, ensure_ascii=False)
    return bool(model.get("byte_fallback")) or "Metaspace" in shape or "\u2581" in shape


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Encode, decode and chat-format text for one checkpoint (see :func:`load_tokenizer`).

    * ``encode(text, allow_special=False)``: token ids; with ``allow_special`` the added tokens
      (``<|user|>`` …) in the text become their ids and ``rstrip`` tokens absorb the whitespace
      after them, as Hugging Face does.
    * ``decode(ids, skip_special_tokens=False)``: text; invalid UTF-8 becomes U+FFFD; ids the
      tokenizer does not know (reserved embedding rows) decode to nothing.
    * ``apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``.
    * ``detokenizer()``: a :class:`StreamingDetokenizer`.
    * ``eos_token_ids`` (tuple, in the order of ``generation_config.json``), ``eos_token_id``,
      ``bos_token_id``, ``vocab_size``, ``added_tokens`` (content -> :class:`AddedToken`).
    """

    def __init__(
        self,
        backend: _BPEBackend | _SentencePieceBackend,
        added_tokens: Iterable[AddedToken],
        *,
        eos_token_ids: Sequence[int] = (),
        bos_token_id: int | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        name: str = "",
    ):
        self._backend = backend
        self.name = name
        self.added_tokens: dict[str, AddedToken] = {t.content: t for t in added_tokens}
        self.special_ids = frozenset(t.id for t in self.added_tokens.values() if t.special)
        table = list(backend.token_bytes)
        top = max([len(table) - 1, *(t.id for t in self.added_tokens.values())])
        table += [None] * (top + 1 - len(table))
        for t in self.added_tokens.values():
            table[t.id] = t.content.encode()
        self._token_bytes = table
        self.vocab_size = len(table)
        self.eos_token_ids = tuple(eos_token_ids)
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.bos_token_id = bos_token_id
        self.eos_token = eos_token
        # None: the Phi template of spec 6.3, in Python; otherwise a Jinja template.
        self.chat_template = None if _is_phi_template(chat_template) else chat_template
        ordered = sorted(self.added_tokens, key=len, reverse=True)  # longest match first
        self._added_re = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __repr__(self) -> str:
        kind = type(self._backend).__name__.strip("_").replace("Backend", "")
        return f"Tokenizer({self.name!r}, {kind}, vocab_size={self.vocab_size})"

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``. No BOS is added (the Phi tokenizer adds none, spec 6.1)."""
        return self._encode_parts([(text, allow_special)])

    def _encode_parts(self, parts: Iterable[tuple[str, bool]]) -> list[int]:
        """Encode text pieces; in those flagged True, added tokens become their ids.

        Plain text between added tokens is encoded as one piece even when it comes from several
        parts, since BPE pre-tokenisation crosses the boundary in the rendered string.
        """
        items: list[str | AddedToken] = []
        absorb = False  # an rstrip token is waiting for the whitespace after it
        for text, allow in parts:
            # a lone surrogate (e.g. from JSON "\ud800") has no UTF-8 form: U+FFFD, as for bad bytes
            text = _SURROGATE.sub("\ufffd", text)
            pieces: list[str | AddedToken] = [text]
            if allow and self._added_re is not None:
                pieces, pos = [], 0
                for m in self._added_re.finditer(text):
                    pieces += [text[pos : m.start()], self.added_tokens[m.group()]]
                    pos = m.end()
                pieces.append(text[pos:])
            for piece in pieces:
                if isinstance(piece, AddedToken):
                    if piece.lstrip and items and isinstance(items[-1], str):
                        items[-1] = items[-1].rstrip(_WHITESPACE)  # text runs are already joined
                        if not items[-1]:
                            items.pop()
                    items.append(piece)
                    absorb = piece.rstrip
                    continue
                if absorb:
                    piece = piece.lstrip(_WHITESPACE)
                    absorb = not piece
                if not piece:
                    continue
                if items and isinstance(items[-1], str):
                    items[-1] += piece
                else:
                    items.append(piece)
        ids: list[int] = []
        for n, item in enumerate(items):
            if isinstance(item, AddedToken):
                ids.append(item.id)
            else:
                ids += self._backend.encode_plain(item, at_start=n == 0)
        return ids

    # -- decoding ------------------------------------------------------------------------------

    def _piece(self, token_id: int, started: bool) -> tuple[bytes, bool]:
        """The bytes id ``token_id`` adds to the output, and whether text has started after it.

        Unknown ids (reserved embedding rows) add nothing. sentencepiece drops the dummy-prefix
        space of the first token that produces text.
        """
        table = self._token_bytes
        data = table[token_id] if 0 <= token_id < len(table) else None
        if not data:
            return b"", started
        if not started and self._backend.dummy_prefix and token_id < len(self._backend.token_bytes):
            return self._backend.first_bytes(token_id), True
        return data, True

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out, started = bytearray(), False
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self.special_ids:
                continue
            data, started = self._piece(i, started)
            out += data
        return out.decode("utf-8", errors="replace")

    def detokenizer(self, skip_special_tokens: bool = False) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self, skip_special_tokens)

    # -- chat ----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **template_variables: Any,
    ) -> list[int] | str:
        """The conversation in the model's chat format: ids, or the string with ``tokenize=False``.

        With the Phi template (spec 6.3) the tokens the template writes are single ids while
        the same text inside message content stays plain text. A checkpoint's own template is
        rendered with jinja2 and all added tokens in the result become ids.
        """
        if self.chat_template is None:
            parts = _phi_chat_parts(messages, add_generation_prompt, self.eos_token or "")
        else:
            variables = {"eos_token": self.eos_token or "", "bos_token": self._bos_text()}
            variables.update(template_variables)
            rendered = _render_jinja(
                self.chat_template, messages, add_generation_prompt, **variables
            )
            parts = [(rendered, True)]
        if not tokenize:
            return "".join(text for text, _ in parts)
        return self._encode_parts(parts)

    def _bos_text(self) -> str:
        if self.bos_token_id is None:
            return ""
        return next((t.content for t in self.added_tokens.values() if t.id == self.bos_token_id), "")


class StreamingDetokenizer:
    """Turns ids into text one at a time, emitting only new, complete characters.

    ``add_token(id)`` returns the text that id completes; a multi-byte character split across
    tokens is held back until its last byte arrives. ``finalize()`` flushes what is left (an
    incomplete character becomes U+FFFD). The pieces concatenate to ``tokenizer.decode(ids)``.
    ``text``, ``tokens`` and ``last_segment`` follow mlx-lm's detokenizer.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False  # text has started (sentencepiece drops its first dummy space)
        self.tokens: list[int] = []
        self._segments: list[str] = []
        self.last_segment = ""

    def add_token(self, token_id: int) -> str:
        token_id = int(token_id)
        self.tokens.append(token_id)
        data = b""
        if not (self._skip and token_id in self._tokenizer.special_ids):
            data, self._started = self._tokenizer._piece(token_id, self._started)
        return self._emit(self._decoder.decode(data))

    def finalize(self) -> str:
        return self._emit(self._decoder.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        self.last_segment = text
        if text:
            self._segments.append(text)
        return text

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._segments)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        return json.loads(data)
    except (OSError, ValueError, EOFError) as exc:
        raise TokenizerError(
            f"{path}: cannot read it as JSON ({exc}); re-download the checkpoint's tokenizer files"
        ) from exc


def _read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object; re-download it")
    return data


def _token_text(value: Any) -> str | None:
    """``bos_token``/``eos_token`` of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _is_phi_template(template: str | None) -> bool:
    return template is None or template.strip() == PHI_CHAT_TEMPLATE


def _chat_template(directory: Path, tokenizer_config: dict) -> str | None:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (directory / "chat_template.json").is_file():
        template = _read_json(directory / "chat_template.json").get("chat_template")
    return template if isinstance(template, str) else None


def _added_from_config(tokenizer_config: dict, added_tokens_json: dict) -> list[AddedToken]:
    """Added tokens of a checkpoint without tokenizer.json (``added_tokens_decoder`` wins)."""
    found: dict[int, AddedToken] = {}
    decoder = tokenizer_config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError("tokenizer_config.json: added_tokens_decoder must be an object of "
                             "{token id: {content, ...}}; re-download the tokenizer files")
    for key, entry in decoder.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(entry, dict)
                and isinstance(entry.get("content"), str)):
            raise TokenizerError(f"tokenizer_config.json: added_tokens_decoder entry {key!r:.40} is not "
                                 "'<token id>': {\"content\": ...}; re-download the tokenizer files")
        found[int(key)] = AddedToken(
            entry["content"],
            int(key),
            special=bool(entry.get("special", False)),
            rstrip=bool(entry.get("rstrip", False)),
            lstrip=bool(entry.get("lstrip", False)),
        )
    known = {t.content for t in found.values()}
    for content, token_id in added_tokens_json.items():
        if content not in known and int(token_id) not in found:
            found[int(token_id)] = AddedToken(content, int(token_id), special=False)
    return list(found.values())


def _pre_tokenizer_pattern(spec: Any, source: Path) -> str:
    """The split regex of a byte-level ``pre_tokenizer`` from tokenizer.json."""

    def unsupported(what: str) -> TokenizerError:
        return TokenizerError(
            f"{source}: unsupported pre_tokenizer ({what}); only GPT-2-style byte-level BPE "
            "(a regex Split followed by ByteLevel) is supported"
        )

    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else [spec]
    pattern = None
    for step in steps:
        kind = (step or {}).get("type")
        if kind == "Split":
            regex = step.get("pattern", {})
            pattern = regex.get("Regex") if "Regex" in regex else re.escape(regex.get("String", ""))
            if (step.get("behavior"), bool(step.get("invert"))) not in (
                ("Isolated", False),
                ("Removed", True),
            ):
                raise unsupported(f"Split behavior {step.get('behavior')}")
        elif kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise unsupported("ByteLevel add_prefix_space")
            if step.get("use_regex", True):
                if pattern is not None:
                    raise unsupported("two split regexes")
                pattern = GPT2_PATTERN
        else:
            raise unsupported(f"type {kind}")
    if pattern is None:
        raise unsupported("no split regex")
    return pattern


def _parse_merge(merge: Any, n: int, source: Path) -> tuple[str, str]:
    parts = merge.split(" ") if isinstance(merge, str) else list(merge)
    if len(parts) != 2:
        raise TokenizerError(f"{source}: merge #{n} {merge!r} is not a pair of tokens")
    return parts[0], parts[1]


def _bpe_ranks(
    vocab: dict[str, int], merges: Sequence[Any], added: Sequence[AddedToken], source: Path
) -> dict[bytes, int]:
    """Byte-string ranks for tiktoken from a byte-level vocabulary and its merge list.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest id;
    Hugging Face merges the pair that comes first in the merge list. The two agree when the merge
    list is sorted by the id of the merged token, which is checked here.
    """
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    added_contents = {t.content for t in added}
    added_ids = {t.id for t in added}
    ranks: dict[bytes, int] = {}
    by_text: dict[str, int] = {}
    for text, token_id in vocab.items():
        if text in added_contents or token_id in added_ids:
            continue  # e.g. vocab.json's stale chat-token ids (spec 6.2 quirk)
        try:
            token = bytes(decoder[c] for c in text)
        except KeyError:
            raise TokenizerError(
                f"{source}: vocabulary entry {text!r} (id {token_id}) is not byte-level text; "
                "this is not a GPT-2-style byte-level BPE tokenizer"
            ) from None
        if token in ranks:
            raise TokenizerError(f"{source}: ids {ranks[token]} and {token_id} are the same bytes")
        ranks[token] = int(token_id)
        by_text[text] = int(token_id)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(
            f"{source}: the vocabulary lacks {len(missing)} of the 256 single-byte tokens "
            f"(first: byte {missing[0]}); byte-level BPE needs all of them"
        )
    previous = -1
    for n, merge in enumerate(merges):
        left, right = _parse_merge(merge, n, source)
        merged = by_text.get(left + right)
        if left not in by_text or right not in by_text or merged is None:
            raise TokenizerError(
                f"{source}: merge #{n} ({left!r} + {right!r}) uses or makes a token that is not in "
                "the vocabulary; the tokenizer files are inconsistent, re-download them"
            )
        if merged < previous:
            raise TokenizerError(
                f"{source}: merge #{n} ({left!r} + {right!r}) makes id {merged}, after a merge "
                f"that made id {previous}. The merge order does not follow the token ids, so "
                "rank-based BPE (tiktoken) would tokenize differently from this file; such "
                "tokenizers are not supported"
            )
        previous = merged
    return ranks


def _check_phi_ids(added: Sequence[AddedToken], regular: int, source: Path) -> None:
    """Warn when a Phi-4-vocabulary tokenizer disagrees with spec 6.2 on a chat token."""
    if regular != _PHI_REGULAR_VOCAB:
        return
    for t in added:
        expected = PHI_ADDED_TOKENS.get(t.content)
        if expected is not None and expected.id != t.id:
            warnings.warn(
                f"{source}: {t.content} has id {t.id}, but the released Phi-4-mini-flash model "
                f"uses {expected.id}; the model may not follow the chat format",
                stacklevel=3,
            )


def _load_tokenizer_json(
    path: Path, sentencepiece_model: Path | None = None
) -> tuple[_BPEBackend | _SentencePieceBackend | _TokenizersBackend, list[AddedToken]]:
    """The back-end of a tokenizer.json: tiktoken for byte-level BPE; for a sentencepiece-style file
    the sentencepiece model it came from when it is there, else Hugging Face tokenizers."""
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
        raise TokenizerError(
            f"{path}: not a BPE tokenizer.json (model type {model and model.get('type')!r}); "
            "re-download it, or use a checkpoint with a byte-level BPE or sentencepiece tokenizer"
        )
    try:
        added = [
            AddedToken(
                t["content"],
                int(t["id"]),
                special=bool(t.get("special", False)),
                rstrip=bool(t.get("rstrip", False)),
                lstrip=bool(t.get("lstrip", False)),
            )
            for t in data.get("added_tokens") or []
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise TokenizerError(
            f"{path}: an added_tokens entry lacks 'content' or an integer 'id' ({exc}); "
            "re-download the tokenizer files"
        ) from exc
    if _is_sentencepiece_json(data):
        if sentencepiece_model is not None:
            backend = _SentencePieceBackend(sentencepiece_model)
            return backend, _sentencepiece_added(backend, {t.content: t for t in added})
        return _TokenizersBackend(data, added, path), added
    if data.get("normalizer") is not None:
        raise TokenizerError(f"{path}: tokenizers with a normalizer are not supported")
    pattern = _pre_tokenizer_pattern(data.get("pre_tokenizer"), path)
    ranks = _bpe_ranks(model["vocab"], model.get("merges") or [], added, path)
    _check_phi_ids(added, len(ranks), path)
    backend = _BPEBackend(ranks, {t.content: t.id for t in added}, pattern, str(path))
    return backend, added


def _load_vocab_merges(directory: Path, tokenizer_config: dict) -> tuple[_BPEBackend, list[AddedToken]]:
    vocab = _read_json(directory / "vocab.json")
    try:
        lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{directory / 'merges.txt'}: cannot read it ({exc}); re-download it") from exc
    merges = [line for line in lines if line.strip() and not line.startswith("#version")]
    added = _added_from_config(tokenizer_config, _read_optional_json(directory / "added_tokens.json"))
    ranks = _bpe_ranks(vocab, merges, added, directory / "merges.txt")
    _check_phi_ids(added, len(ranks), directory / "tokenizer_config.json")
    # These files carry no pre-tokenizer; the Phi-4 family splits with the o200k regex.
    backend = _BPEBackend(ranks, {t.content: t.id for t in added}, O200K_PATTERN, str(directory))
    return backend, added


def _load_sentencepiece(path: Path, tokenizer_config: dict) -> tuple[_SentencePieceBackend, list[AddedToken]]:
    backend = _SentencePieceBackend(path)
    configured = {t.content: t for t in _added_from_config(tokenizer_config, {})}
    return backend, _sentencepiece_added(backend, configured)


def _sentencepiece_added(
    backend: _SentencePieceBackend, configured: Mapping[str, AddedToken]
) -> list[AddedToken]:
    """The model's control and user-defined pieces, with the flags the tokenizer files give them."""
    added = []
    for content, token_id, kind in backend.added_tokens():
        flags = configured.get(content) or PHI_ADDED_TOKENS.get(content)
        if flags is not None:
            added.append(
                AddedToken(content, token_id, flags.special, rstrip=flags.rstrip, lstrip=flags.lstrip)
            )
        else:
            added.append(AddedToken(content, token_id, special=True))
    return added


def sentencepiece_tokenizer_json(
    path: str | Path, added_tokens: Mapping[str, AddedToken] | None = None
) -> dict:
    """The Hugging Face ``tokenizer.json`` that tokenizes like the sentencepiece BPE model at ``path``.

    The model's own normalizer (its precompiled character map, then the removal of leading,
    trailing and repeated spaces where the model does that), spaces as ``▁``, BPE merges ranked by
    piece score (ties: shorter left part first), byte fallback, and the control and user-defined
    pieces as added tokens with the flags of ``added_tokens`` (content -> :class:`AddedToken`;
    default: special, no stripping). Models that add a dummy prefix are refused: no tokenizer.json
    puts it exactly where sentencepiece does. transformers reads the result with
    ``"tokenizer_class": "PreTrainedTokenizerFast"`` (a Llama tokenizer class would rebuild the
    normalizer and pre-tokenizer its own way).
    """
    import base64

    import sentencepiece as spm

    path = Path(path)
    proto = path.read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    spec = {"charsmap": b"", "dummy": True, "extra": True, "escape": True}
    model_type, byte_fallback = 1, False
    for field, _, value in _proto_fields(proto):
        if field == 2:  # TrainerSpec
            for f, _, v in _proto_fields(value):
                if f == 3:
                    model_type = v
                elif f == 35:
                    byte_fallback = bool(v)
        elif field == 3:  # NormalizerSpec
            for f, _, v in _proto_fields(value):
                key = {2: "charsmap", 3: "dummy", 4: "extra", 5: "escape"}.get(f)
                if key:
                    spec[key] = v if key == "charsmap" else bool(v)
    if model_type != 2 or not spec["escape"]:
        raise TokenizerError(
            f"{path}: only sentencepiece BPE models that write spaces as ▁ can be written as "
            "tokenizer.json"
        )
    if spec["dummy"]:
        # Metaspace's "first" prefix misses text whose leading space the normalizer removed, or
        # that starts with a space; "always" also prefixes text after an added token
        raise TokenizerError(
            f"{path}: a model with a dummy prefix (add_dummy_prefix) has no exact tokenizer.json "
            "form; train it with add_dummy_prefix=False"
        )
    added_tokens = added_tokens or {}
    vocab, added, normal = {}, [], {}
    for i, kind in enumerate(_SentencePieceBackend(path).types):
        piece = sp.id_to_piece(i)
        vocab[piece] = i
        if kind == _SP_NORMAL:
            normal[piece] = (-sp.get_score(i), i)
        elif kind != _SP_BYTE:  # unknown, control, user-defined, unused
            added.append(added_tokens.get(piece) or AddedToken(piece, i, special=True))
    ranked = []
    for piece, rank in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((rank, k, left, right))
    merges = [[left, right] for _, _, left, right in sorted(ranked)]
    normalizers = []
    if spec["charsmap"]:
        charsmap = base64.b64encode(spec["charsmap"]).decode()
        normalizers.append({"type": "Precompiled", "precompiled_charsmap": charsmap})
    if spec["extra"]:
        normalizers += [
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
            {"type": "Replace", "pattern": {"Regex": "^ | $"}, "content": ""},
        ]
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}]
    if byte_fallback:
        decoders.append({"type": "ByteFallback"})
    decoders.append({"type": "Fuse"})
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": vocab[t.content],
                "content": t.content,
                "single_word": False,
                "lstrip": t.lstrip,
                "rstrip": t.rstrip,
                "normalized": False,
                "special": t.special,
            }
            for t in sorted(added, key=lambda t: vocab[t.content])
        ],
        "normalizer": {"type": "Sequence", "normalizers": normalizers} if normalizers else None,
        "pre_tokenizer": {
            "type": "Metaspace",
            "replacement": "▁",
            "prepend_scheme": "never",
            "split": False,
        },
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": byte_fallback,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def _int_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return []


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer of a checkpoint directory, or None when it has no tokenizer files.

    Looks for, in this order: ``tokenizer.json``; ``vocab.json`` + ``merges.txt`` (with
    ``added_tokens.json`` / ``tokenizer_config.json``); ``tokenizer.model`` (sentencepiece).
    eos ids come from ``generation_config.json`` (an int or a list), else ``config.json``, else
    the ``eos_token`` of ``tokenizer_config.json`` (else a sentencepiece model's ``</s>``). Without
    a chat template in the files, the Phi-4 one (spec 6.3) is used.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise TokenizerError(f"{directory}: not a directory; pass the checkpoint's directory")
    tokenizer_config = _read_optional_json(directory / "tokenizer_config.json")
    if (directory / "tokenizer.json").is_file():
        sp_model = directory / "tokenizer.model"
        backend, added = _load_tokenizer_json(
            directory / "tokenizer.json", sp_model if sp_model.is_file() else None
        )
        _added_from_config(tokenizer_config, {})  # a broken added_tokens_decoder is still reported
    elif (directory / "vocab.json").is_file():
        if not (directory / "merges.txt").is_file():
            raise TokenizerError(
                f"{directory}: has vocab.json but neither merges.txt nor tokenizer.json; "
                "download tokenizer.json from the model's repository"
            )
        backend, added = _load_vocab_merges(directory, tokenizer_config)
    elif (directory / "tokenizer.model").is_file():
        backend, added = _load_sentencepiece(directory / "tokenizer.model", tokenizer_config)
    else:
        return None

    by_content = {t.content: t.id for t in added}
    generation = _read_optional_json(directory / "generation_config.json")
    config = _read_optional_json(directory / "config.json")
    eos_text = _token_text(tokenizer_config.get("eos_token"))
    bos_text = _token_text(tokenizer_config.get("bos_token"))
    eos_ids = _int_list(generation.get("eos_token_id")) or _int_list(config.get("eos_token_id"))
    if not eos_ids and eos_text in by_content:
        eos_ids = [by_content[eos_text]]
    bos_ids = _int_list(generation.get("bos_token_id")) or _int_list(config.get("bos_token_id"))
    if not bos_ids and bos_text in by_content:
        bos_ids = [by_content[bos_text]]
    if isinstance(backend, _SentencePieceBackend):  # the model's own </s> and <s>
        eos_ids = eos_ids or [i for i in [backend.sp.eos_id()] if i >= 0]
        bos_ids = bos_ids or [i for i in [backend.sp.bos_id()] if i >= 0]
    if eos_text is None:  # the text the template writes when it ends a conversation
        eos_text = next((t.content for t in added if eos_ids and t.id == eos_ids[-1]), None)
    return Tokenizer(
        backend,
        added,
        eos_token_ids=eos_ids,
        bos_token_id=bos_ids[0] if bos_ids else None,
        eos_token=eos_text,
        chat_template=_chat_template(directory, tokenizer_config),
        name=str(directory),
    )
