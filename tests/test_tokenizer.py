"""Tokenizer and chat format (spec Section 6) against Hugging Face ``tokenizers`` and jinja2."""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phiflash_mlx.errors import PhiflashError
from phiflash_mlx.tokenizer import (
    PHI_ADDED_TOKENS,
    PHI_CHAT_TEMPLATE,
    Tokenizer,
    TokenizerError,
    bytes_to_unicode,
    load_tokenizer,
    render_phi_chat,
)
from tokenizer_fixtures import build_phi_tokenizer_dirs, tokenizer_config

hf_tokenizers = pytest.importorskip("tokenizers")
jinja2_sandbox = pytest.importorskip("jinja2.sandbox")
pytest.importorskip("bpe_openai")

# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def phi_dirs(pytestconfig, tmp_path_factory) -> tuple[Path, Path]:
    """(tokenizer.json dir, vocab.json + merges.txt dir), cached across runs in .pytest_cache."""
    cache = getattr(pytestconfig, "cache", None)
    root = cache.mkdir("phiflash-tokenizer") if cache else tmp_path_factory.mktemp("tokenizer")
    return build_phi_tokenizer_dirs(Path(root))


@pytest.fixture(scope="session")
def phi(phi_dirs) -> Tokenizer:
    return load_tokenizer(phi_dirs[0])


@pytest.fixture(scope="session")
def hf(phi_dirs):
    return hf_tokenizers.Tokenizer.from_file(str(phi_dirs[0] / "tokenizer.json"))


def hf_ids(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False).ids


def jinja_render(template: str, messages, add_generation_prompt: bool, eos_token="<|endoftext|>") -> str:
    """How transformers renders a chat template."""
    env = jinja2_sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, eos_token=eos_token
    )


# ---------------------------------------------------------------------------------------------
# A mixed corpus: code, scripts, emoji, whitespace, numbers, contractions
# ---------------------------------------------------------------------------------------------

_SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we'd've done it; you're right, it's John's and THEY'RE HERE. She'S",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < 10; ++i) {\n\tprintf(\"%d\\n\", i);\n}\r\n",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;",
    "<html><body class=\"main\">&nbsp;<a href='https://example.com/a/b?c=1&d=2'>link</a></body></html>",
    "$$\\int_0^\\infty e^{-x^2}\\,dx = \\frac{\\sqrt{\\pi}}{2}$$ and \\boxed{42}",
    "How to solve 3*x^2+4*x+5=1? Please reason step by step, and put your final answer within \\boxed{}.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю. ПРИВЕТ, Мир!",
    "Широкая электрификация южных губерний даст мощный толчок подъёму сельского хозяйства.",
    "我能吞下玻璃而不伤身体。机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "日本語のテキスト：すもももももももものうち。カタカナとひらがな、漢字。",
    "한국어 문장입니다. 다람쥐 헌 쳇바퀴에 타고파.",
    "نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر ومغلف بجلد أزرق.",
    "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले विष्णुवतार भगवान श्रीराम",
    "Ελληνικά: Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. עברית: דג סקרן שט בים מאוכזב",
    "ไทย: เป็นมนุษย์สุดประเสริฐเลิศคุณค่า Tiếng Việt: Tôi có thể ăn thủy tinh mà không hại gì.",
    "Emoji: 😀😃😄 👍🏽 🇫🇷🇯🇵 ❤️‍🔥 👨‍👩‍👧‍👦 🧑🏿‍🚀 🏳️‍🌈 ✈️ 1️⃣ 🫠🫶",
    "Combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Z\u0351\u036b\u0343\u036a\u0302a\u0352lgo",
    "Whitespace:   three\t\ttabs\n\n\nnewlines \r\n\r\n crlf \u00a0nbsp \u3000ideographic \u2003em   ",
    "     leading spaces and trailing spaces     ",
    "\n\n\n\n",
    " \t \n \t\n",
    "Numbers: 3.14159265358979323846 1234567890123456789012345 -0.000001 1e-10 1,000,000 0x7FFF_FFFF",
    "Dates 2024-01-15T13:45:30Z, phone +1 (555) 123-4567, IPv4 192.168.0.1, version v1.2.3-rc4",
    "Punctuation!!! ??? ... --- *** ''' \"\"\" ``` ~~~ ((())) [[]] {{}} <<>> ||| /// \\\\\\ ^^^ %%%",
    "CamelCaseIdentifiers and snake_case_names and SCREAMING_SNAKE and kebab-case-words",
    "URLs: https://huggingface.co/microsoft/Phi-4-mini-flash-reasoning/blob/main/config.json",
    "Mixed: café naïve résumé Zürich Ångström ŁÓDŹ ÆØÅ ß ẞ ﬁ ﬂ ½ ² ™ © ® € £ ¥ ₹",
    "Math symbols: ∀x∈ℝ, ∃y: x² + y² ≤ 1 → ∫∫ dA ≈ π; ∑ᵢ aᵢ ≠ ∏ⱼ bⱼ; ⊂ ⊆ ∪ ∩ ¬ ∧ ∨ ⊕",
    "Box drawing: ┌─┬─┐ │ │ │ ├─┼─┤ └─┴─┘ and braille ⠁⠃⠉ and music 𝄞 and old italic 𐌰𐌱",
    "Control-ish: \x00\x01\x1b[31mred\x1b[0m \x7f \u200b zero-width \ufeff BOM \u200d joiner",
    "A" * 300,
    "ab" * 150 + " " + "🙂" * 40,
    "1" * 100,
    " " * 64 + "x" + "\n" * 33,
    "Mr. O'Neill's dog didn't bark. We've 'quoted' words and ’curly’ apostrophes’ll.",
    "JSON: {\"key\": [1, 2.5, true, null, \"value with \\\"escapes\\\"\"], \"nested\": {\"a\": {}}}",
    "YAML:\n  - name: test\n    value: 42\n  - name: other\n    value: -7\n",
    "Rust: fn main() { let v: Vec<u8> = vec![1, 2, 3]; println!(\"{:?}\", v); }",
    "Shell: for f in *.txt; do echo \"$f\" | tr '[:lower:]' '[:upper:]' >> out.log; done",
]


def _corpus() -> list[str]:
    texts = list(_SAMPLES)
    runs = [" ", "\t", "\n", "\r\n", "\u00a0", "\u3000", " \n"]
    texts += [f"a{ws * k}b{ws * k}" for ws in runs for k in (1, 2, 3, 7, 16)]
    texts += [str(7 ** k) + " " + str(2 ** (3 * k)) for k in range(1, 60, 3)]
    texts.append("\n".join(_SAMPLES))  # one long document
    return texts


CORPUS = _corpus()


# ---------------------------------------------------------------------------------------------
# Byte-level BPE (the released model's tokenizer)
# ---------------------------------------------------------------------------------------------


def test_bytes_to_unicode_is_a_bijection():
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert mapping[ord(" ")] == "Ġ" and mapping[ord("\n")] == "Ċ" and mapping[ord("A")] == "A"


def test_added_tokens_agree_with_spec(phi, hf):
    assert {t.content: t for t in phi.added_tokens.values()} == PHI_ADDED_TOKENS
    for content, token in PHI_ADDED_TOKENS.items():
        assert phi.encode(content, allow_special=True) == [token.id]
        assert hf.token_to_id(content) == token.id
        assert phi.decode([token.id]) == content
    assert phi.eos_token_ids == (200020, 199999)
    assert phi.eos_token_id == 200020 and phi.bos_token_id == 199999
    assert phi.vocab_size == 200029


def test_corpus_matches_hugging_face(phi, hf):
    total_chars = total_ids = 0
    for text in CORPUS:
        ids = phi.encode(text)
        assert ids == hf_ids(hf, text), text
        assert phi.decode(ids) == text
        assert hf.decode(ids, skip_special_tokens=False) == text
        total_chars += len(text)
        total_ids += len(ids)
    assert len(CORPUS) > 90 and total_chars > 8_000 and total_ids > 3_000


def test_vocab_and_merges_files_give_the_same_ids(phi, phi_dirs):
    from_vocab = load_tokenizer(phi_dirs[1])
    for text in CORPUS:
        assert from_vocab.encode(text) == phi.encode(text)
    # vocab.json has stale chat-token ids; added_tokens_decoder wins (spec 6.2).
    assert {t.content: t.id for t in from_vocab.added_tokens.values()} == {
        c: t.id for c, t in PHI_ADDED_TOKENS.items()
    }
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert from_vocab.apply_chat_template(messages) == phi.apply_chat_template(messages)
    assert from_vocab.eos_token_ids == (200020, 199999)


def test_special_token_text_stays_plain_text(phi):
    text = "say <|end|> and <|user|> please"
    ids = phi.encode(text)
    assert not set(ids) & {t.id for t in PHI_ADDED_TOKENS.values()}
    assert phi.decode(ids) == text
    assert phi.encode("<|end|>", allow_special=True) == [200020]


@pytest.mark.parametrize(
    "text",
    [
        "<|user|>  \n\t Hello<|end|>\n<|assistant|> ok",
        "<|system|>\u3000\u2003x<|end|>",
        "<|user|>\x1c\x1dkept<|end|>",  # not White_Space: not absorbed
        "a <|endoftext|>  b <|endofprompt|>\n c",  # no rstrip: whitespace kept
        "<|tool|>[{\"name\": \"f\"}]<|/tool|> <|tool_call|> x <|/tool_call|>  <|tool_response|>\n y <|tag|> ",
        "<|user|>",
        "<|user|>   ",
    ],
)
def test_allow_special_and_rstrip_match_hugging_face(phi, hf, text):
    assert phi.encode(text, allow_special=True) == hf_ids(hf, text)


def test_skip_special_tokens(phi):
    ids = phi.encode("<|user|>hi<|end|><|tool|>x<|/tool|><|assistant|>", allow_special=True)
    # the tool tokens are not special (spec 6.2), so they survive
    assert phi.decode(ids, skip_special_tokens=True) == "hi<|tool|>x<|/tool|>"


def test_unknown_ids_decode_to_nothing(phi):
    hello = phi.encode("hello")
    assert phi.decode([199998, *hello, 200005, 200063, -1]) == "hello"


def test_chat_template_spec_example(phi):
    messages = [{"role": "user", "content": "How to solve 3*x^2+4*x+5=1?"}]
    text = phi.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|>How to solve 3*x^2+4*x+5=1?<|end|><|assistant|>"
    ids = phi.apply_chat_template(messages)
    assert ids[0] == 200021 and ids[-2:] == [200020, 200019]
    assert ids[1:-2] == phi.encode("How to solve 3*x^2+4*x+5=1?")
    closed = phi.apply_chat_template(messages, add_generation_prompt=False)
    assert closed[-1] == 199999


def test_chat_template_with_tools(phi, hf):
    tools = '[{"name": "get_weather", "parameters": {"city": {"type": "str"}}}]'
    messages = [
        {"role": "system", "content": "You can call tools.", "tools": tools},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": '<|tool_call|>[{"name": "get_weather"}]<|/tool_call|>'},
    ]
    text = phi.apply_chat_template(messages, tokenize=False)
    assert text == jinja_render(PHI_CHAT_TEMPLATE, messages, True)
    assert text.startswith("<|system|>You can call tools.<|tool|>" + tools + "<|/tool|><|end|><|user|>")
    ids = phi.apply_chat_template(messages)
    assert 200023 in ids and 200024 in ids
    # the tool-call text came from message content, so it stays text
    assert 200025 not in ids
    assert phi.decode(ids) == text
    with_list = [dict(messages[0], tools=json.loads(tools))]
    assert '"get_weather"' in phi.apply_chat_template(with_list, tokenize=False)


def test_chat_template_errors(phi):
    with pytest.raises(PhiflashError):
        phi.apply_chat_template([{"role": "user"}])
    with pytest.raises(PhiflashError):
        phi.apply_chat_template([{"role": "user", "content": None}])


def test_other_chat_template_is_rendered_with_jinja(phi_dirs, tmp_path):
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "tokenizer.json").symlink_to(phi_dirs[0] / "tokenizer.json")
    config = tokenizer_config()
    config["chat_template"] = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] | trim + '<|end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )
    (custom / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(custom)
    messages = [{"role": "user", "content": "  Hi there  "}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|>\nHi there<|end|>\n<|assistant|>\n"
    assert tok.apply_chat_template(messages) == tok.encode(text, allow_special=True)


_role = st.sampled_from(["system", "user", "assistant", "tool", "function"])
_content = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from([*"ab \n\t<|>/é🙂", "<|end|>", "<|user|>", "  "]), max_size=12).map("".join),
)
_message = st.builds(
    lambda role, content, tools: (
        {"role": role, "content": content}
        if tools is None
        else {"role": role, "content": content, "tools": tools}
    ),
    _role,
    _content,
    st.one_of(st.none(), st.text(max_size=30)),
)


@settings(max_examples=40, deadline=None)
@given(messages=st.lists(_message, max_size=5), add_generation_prompt=st.booleans())
def test_random_conversations_render_like_jinja(phi, hf, messages, add_generation_prompt):
    text = render_phi_chat(messages, add_generation_prompt)
    assert text == jinja_render(PHI_CHAT_TEMPLATE, messages, add_generation_prompt)
    assert phi.apply_chat_template(messages, add_generation_prompt, tokenize=False) == text
    ids = phi.apply_chat_template(messages, add_generation_prompt)
    specials = [t for t in PHI_ADDED_TOKENS if any(t in m["content"] or t in (m.get("tools") or "") for m in messages)]
    if not specials:  # Hugging Face turns such text into ids; we keep it as text
        assert ids == hf_ids(hf, text)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=80))
def test_random_text_round_trips_and_matches_hugging_face(phi, hf, text):
    ids = phi.encode(text)
    assert phi.decode(ids) == text
    if not any(t in text for t in PHI_ADDED_TOKENS):  # Hugging Face would turn these into ids
        assert ids == hf_ids(hf, text)


# ---------------------------------------------------------------------------------------------
# Streaming detokenizer
# ---------------------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids, **kwargs) -> list[str]:
    detok = tok.detokenizer(**kwargs)
    pieces = [detok.add_token(i) for i in ids]
    pieces.append(detok.finalize())
    assert detok.text == "".join(pieces)
    assert detok.tokens == list(ids)
    return pieces


def test_streaming_holds_back_split_characters(phi):
    text = "🫠 ok 𝄞"
    ids = phi.encode(text)
    assert len(ids) > len(text.split())  # some characters span several tokens
    pieces = _stream(phi, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1]  # a token that ended mid-character emitted nothing


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=200040), max_size=30), skip=st.booleans())
def test_streaming_random_ids_concatenate_to_decode(phi, ids, skip):
    assert "".join(_stream(phi, ids, skip_special_tokens=skip)) == phi.decode(ids, skip_special_tokens=skip)


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=60))
def test_streaming_text_never_emits_broken_characters(phi, text):
    pieces = _stream(phi, phi.encode(text))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


# ---------------------------------------------------------------------------------------------
# sentencepiece
# ---------------------------------------------------------------------------------------------

_SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, how are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "Привет, как дела? Всё хорошо.",
    "数学问题：二加二等于四。",
    "Numbers 12345 and 67890, symbols <|> and | and /.",
]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SP_CORPUS * 20),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        hard_vocab_limit=False,
        user_defined_symbols=list(PHI_ADDED_TOKENS),
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    directory = tmp_path_factory.mktemp("sentencepiece")
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return directory


@pytest.fixture(scope="module")
def sp_tok(sp_dir) -> Tokenizer:
    return load_tokenizer(sp_dir)


def test_sentencepiece_chat_tokens_are_single_ids(sp_tok):
    for content, token in PHI_ADDED_TOKENS.items():
        [token_id] = sp_tok.encode(content, allow_special=True)
        assert sp_tok.added_tokens[content].id == token_id
        assert sp_tok.added_tokens[content].special == token.special
        assert sp_tok.decode([token_id]) == content
    assert sp_tok.eos_token_ids == (2,) and sp_tok.bos_token_id == 1
    messages = [{"role": "user", "content": "Hello world"}]
    ids = sp_tok.apply_chat_template(messages)
    end, assistant, user = (sp_tok.added_tokens[t].id for t in ("<|end|>", "<|assistant|>", "<|user|>"))
    assert ids[0] == user and ids[-2:] == [end, assistant]
    assert sp_tok.decode(ids) == "<|user|>Hello world<|end|><|assistant|>"
    plain = sp_tok.encode("a <|end|> b")
    assert end not in plain and sp_tok.decode(plain) == "a <|end|> b"


@pytest.mark.parametrize("text", [*_SP_CORPUS, " leading", "  two", "emoji 🎉 and ünïcödé", "", "\n"])
def test_sentencepiece_round_trips_like_sentencepiece(sp_tok, text):
    import sentencepiece as spm

    ids = sp_tok.encode(text)
    assert sp_tok.decode(ids) == text
    sp = spm.SentencePieceProcessor(model_file=sp_tok.name + "/tokenizer.model")
    assert ids == sp.encode(text)
    assert sp_tok.decode(ids) == sp.decode(ids)


@settings(max_examples=30, deadline=None)
@given(text=st.text(max_size=40))
def test_sentencepiece_random_text_round_trips_and_streams(sp_tok, text):
    ids = sp_tok.encode(text)
    assert sp_tok.decode(ids) == text
    assert "".join(_stream(sp_tok, ids)) == text


# ---------------------------------------------------------------------------------------------
# Loading and errors
# ---------------------------------------------------------------------------------------------


def _tiny_tokenizer_json(ranks_of_merged=(256, 257), pre_tokenizer=None) -> dict:
    to_text = bytes_to_unicode()
    vocab = {to_text[b]: b for b in range(256)}
    vocab["ab"], vocab["abc"] = ranks_of_merged
    return {
        "added_tokens": [
            {"id": 258, "content": "<|end|>", "special": True, "rstrip": True, "lstrip": False,
             "single_word": False, "normalized": False},
        ],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer
        or {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b"], ["ab", "c"]]},
    }


def _write(directory: Path, name: str, data) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(data if isinstance(data, str) else json.dumps(data))


def test_tiny_gpt2_style_tokenizer_and_eos_sources(tmp_path):
    _write(tmp_path, "tokenizer.json", _tiny_tokenizer_json())
    tok = load_tokenizer(tmp_path)
    assert tok.encode("abc abd") == [257, 32, 256, 100]
    assert tok.eos_token_ids == ()
    _write(tmp_path, "tokenizer_config.json", {"eos_token": {"content": "<|end|>"}})
    assert load_tokenizer(tmp_path).eos_token_ids == (258,)
    _write(tmp_path, "config.json", {"eos_token_id": 7})
    assert load_tokenizer(tmp_path).eos_token_ids == (7,)
    _write(tmp_path, "generation_config.json", {"eos_token_id": [258, 7]})
    assert load_tokenizer(tmp_path).eos_token_ids == (258, 7)
    hf = hf_tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["abc abd", "cab<|end|>  abc", "a b c abcabc"]:
        assert tok.encode(text, allow_special=True) == hf_ids(hf, text)


def test_lstrip_matches_hugging_face(tmp_path):
    data = _tiny_tokenizer_json()
    data["added_tokens"][0]["lstrip"] = True
    _write(tmp_path, "tokenizer.json", data)
    tok = load_tokenizer(tmp_path)
    hf = hf_tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["ab  <|end|>  c", "  <|end|>", "x \n<|end|><|end|> y"]:
        assert tok.encode(text, allow_special=True) == hf_ids(hf, text)


def test_merge_order_must_follow_ids(tmp_path):
    _write(tmp_path, "tokenizer.json", _tiny_tokenizer_json(ranks_of_merged=(257, 256)))
    with pytest.raises(TokenizerError, match="merge order does not follow the token ids"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "files, message",
    [
        ({"tokenizer.json": '{"model": {"type": "BPE", "vocab"'}, "tokenizer.json: cannot read it as JSON"),
        ({"tokenizer.json": {"model": {"type": "Unigram", "vocab": []}}}, "not a BPE tokenizer.json"),
        ({"vocab.json": {"a": 0}}, "neither merges.txt nor tokenizer.json"),
        ({"tokenizer.model": "not a protobuf"}, "tokenizer.model: not a readable sentencepiece model"),
        ({"tokenizer.json": "{}", "tokenizer_config.json": "[1,"}, "tokenizer_config.json: cannot read"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path, files, message):
    for name, data in files.items():
        _write(tmp_path, name, data)
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(tmp_path)
    assert issubclass(TokenizerError, PhiflashError)


def test_unsupported_pre_tokenizer_and_missing_bytes(tmp_path):
    data = _tiny_tokenizer_json(pre_tokenizer={"type": "Whitespace"})
    _write(tmp_path, "tokenizer.json", data)
    with pytest.raises(TokenizerError, match="unsupported pre_tokenizer"):
        load_tokenizer(tmp_path)
    data = _tiny_tokenizer_json()
    del data["model"]["vocab"]["Ġ"]
    _write(tmp_path, "tokenizer.json", data)
    with pytest.raises(TokenizerError, match="single-byte tokens"):
        load_tokenizer(tmp_path)


def test_no_tokenizer_files_gives_none(tmp_path):
    assert load_tokenizer(tmp_path) is None
    with pytest.raises(TokenizerError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")


def test_phi_vocabulary_with_wrong_chat_ids_warns(phi_dirs, tmp_path):
    data = json.loads((phi_dirs[0] / "tokenizer.json").read_text(encoding="utf-8"))
    for entry in data["added_tokens"]:
        if entry["content"] == "<|user|>":
            entry["id"] = 200040
    data["model"]["vocab"]["<|user|>"] = 200040
    _write(tmp_path, "tokenizer.json", data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = load_tokenizer(tmp_path)
    assert any("<|user|> has id 200040" in str(w.message) for w in caught)
    assert tok.encode("<|user|>", allow_special=True) == [200040]
    shutil.rmtree(tmp_path)


# ---------------------------------------------------------------------------------------------
# phiflash_mlx.load with the released checkpoint's file layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["tokenizer.json", "vocab.json + merges.txt"])
def test_load_returns_the_tokenizer_of_a_released_layout(phi_dirs, tmp_path, layout):
    """Golden weights beside the released model's tokenizer files: load() gives a working tokenizer."""
    import shutil

    import phiflash_mlx
    from conftest import golden_path

    source = phi_dirs[0] if layout == "tokenizer.json" else phi_dirs[1]
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(source, checkpoint)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(golden_path("tiny") / name, checkpoint / name)
    model, tok = phiflash_mlx.load(str(checkpoint))
    assert tok is not None and tok.eos_token_ids == (200020, 199999)
    ids = tok.apply_chat_template([{"role": "user", "content": "How to solve 3*x^2+4*x+5=1?"}])
    assert ids[0] == 200021 and ids[-2:] == [200020, 200019]
    assert tok.decode(ids) == "<|user|>How to solve 3*x^2+4*x+5=1?<|end|><|assistant|>"


# ---------------------------------------------------------------------------------------------
# The demo checkpoint's Hugging Face files: transformers / mlx-lm tokenize and frame chats as we do
# ---------------------------------------------------------------------------------------------

DEMO = Path(__file__).resolve().parents[1] / "phiflash_mlx" / "demo" / "model"

# Conversations as the demo sees them: a system message, several turns, odd whitespace, unicode.
DEMO_CONVERSATIONS = [
    [{"role": "user", "content": "What is 457 + 68?"}],
    [{"role": "system", "content": "You are a careful calculator."},
     {"role": "user", "content": "Subtract 68 from 403."}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "  Tom has 457 apples.\nTom gets 68 more apples.  "}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 * 7?"},
     {"role": "assistant", "content": "84"}, {"role": "user", "content": "And 84 - 9?"},
     {"role": "assistant", "content": "75"}, {"role": "user", "content": "héllo ∑ 🎉\ttab"}],
]


def _demo_texts() -> list[str]:
    from phiflash_mlx.demo import tasks

    texts = ["", " ", "\n", "  two  spaces  ", "ﬁ Ａ ①…", "\x00\x07\x7f", "日本 \u3000 \u00a0 😀"]
    for p in tasks.problems(40, seed=3):
        texts += [p.question, p.trace, str(p.answer), f" {p.question}\n\n{p.trace} "]
    return texts


def _demo_flags() -> dict:
    from phiflash_mlx.tokenizer import AddedToken

    config = json.loads((DEMO / "tokenizer_config.json").read_text())
    return {e["content"]: AddedToken(e["content"], int(i), e["special"], rstrip=e["rstrip"],
                                     lstrip=e["lstrip"])
            for i, e in config["added_tokens_decoder"].items()}


def test_demo_tokenizer_json_is_the_form_of_its_sentencepiece_model():
    """The shipped tokenizer.json is what the training script writes from tokenizer.model."""
    from phiflash_mlx.tokenizer import sentencepiece_tokenizer_json

    shipped = json.loads((DEMO / "tokenizer.json").read_text(encoding="utf-8"))
    assert shipped == sentencepiece_tokenizer_json(DEMO / "tokenizer.model", _demo_flags())
    config = json.loads((DEMO / "tokenizer_config.json").read_text())
    assert config["chat_template"] == PHI_CHAT_TEMPLATE
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_demo_tokenizer_json_encodes_task_text_like_sentencepiece():
    """Oracle: the sentencepiece library on tokenizer.model; subject: Hugging Face tokenizers on the
    shipped tokenizer.json (what transformers and mlx-lm use)."""
    import random

    import sentencepiece as spm

    sp, hf = _demo_sp(spm), _demo_hf_tokenizers()
    rng = random.Random(0)
    alphabet = list("abcXYZ 0123456789+-*=.,:?!'\"\n\t\r") + [
        "é", "ß", "ﬁ", "Ａ", "∑", "日本", "\u3000", "\u00a0", "\u200b", "😀", "\x00", "\x7f", "\u2028", "①", "▁"]
    texts = _demo_texts() + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20))) for _ in range(500)]
    for t in texts:
        ids = sp.encode(t)
        assert hf.encode(t, add_special_tokens=False).ids == ids, repr(t)
        assert hf.decode(ids) == sp.decode(ids), repr(t)


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab 12+.\n\t") + ["é", "ﬁ", "Ａ", "\u3000", "😀", "\x01"]),
                    max_size=24))
def test_demo_tokenizer_json_encodes_like_sentencepiece(text):
    import sentencepiece as spm

    assert _demo_hf_tokenizers().encode(text, add_special_tokens=False).ids == _demo_sp(spm).encode(text)


_DEMO_CACHE: dict = {}


def _demo_sp(spm):
    if "sp" not in _DEMO_CACHE:
        _DEMO_CACHE["sp"] = spm.SentencePieceProcessor(model_file=str(DEMO / "tokenizer.model"))
    return _DEMO_CACHE["sp"]


def _demo_hf_tokenizers():
    if "hf" not in _DEMO_CACHE:
        _DEMO_CACHE["hf"] = hf_tokenizers.Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    return _DEMO_CACHE["hf"]


def test_sentencepiece_json_refuses_a_dummy_prefix(sp_dir):
    """No tokenizer.json puts sentencepiece's dummy prefix exactly where sentencepiece does."""
    from phiflash_mlx.tokenizer import sentencepiece_tokenizer_json

    with pytest.raises(TokenizerError, match="dummy prefix.*add_dummy_prefix=False"):
        sentencepiece_tokenizer_json(sp_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def transformers_demo():
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(str(DEMO))


@pytest.mark.parametrize("n", range(len(DEMO_CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_transformers_frames_demo_chats_like_us(transformers_demo, n, add_generation_prompt):
    """transformers' AutoTokenizer on the demo (what mlx_lm.chat / mlx_lm.server use) gives our ids."""
    messages = DEMO_CONVERSATIONS[n]
    ours = load_tokenizer(DEMO)
    theirs = transformers_demo.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert theirs == ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert transformers_demo.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    ) == ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def test_transformers_encodes_and_decodes_demo_text_like_us(transformers_demo):
    ours = load_tokenizer(DEMO)
    for text in _demo_texts():
        ids = ours.encode(text)
        assert transformers_demo.encode(text, add_special_tokens=False) == ids, repr(text)
        assert transformers_demo.decode(ids) == ours.decode(ids)
    assert set(transformers_demo.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"])) == set(
        ours.eos_token_ids
    )


@pytest.mark.parametrize("tokenizer_class", ["PreTrainedTokenizerFast", "LlamaTokenizer"])
def test_tokenizer_files_rewritten_by_transformers_load(transformers_demo, tmp_path, tokenizer_class):
    """``mlx_lm.convert`` writes the tokenizer back with transformers' ``save_pretrained`` (only
    tokenizer.json, tokenizer_config.json and chat_template.jinja; no tokenizer.model). Those files
    load, and tokenize like the demo. With the demo's earlier ``LlamaTokenizer`` class transformers
    writes a differently-normalized tokenizer.json; we then tokenize as that file says (as
    transformers does)."""
    transformers = pytest.importorskip("transformers")
    source = tmp_path / "source"
    shutil.copytree(DEMO, source)
    if tokenizer_class == "LlamaTokenizer":
        (source / "tokenizer.json").unlink()
        config = json.loads((source / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "LlamaTokenizer"
        (source / "tokenizer_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(tmp_path / "out"))
        reread = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    out = tmp_path / "out"
    assert not (out / "tokenizer.model").exists() and (out / "tokenizer.json").is_file()
    for name in ("generation_config.json", "config.json"):
        shutil.copy(DEMO / name, out / name)
    tok = load_tokenizer(out)
    demo = load_tokenizer(DEMO)
    assert tok.eos_token_ids == demo.eos_token_ids == (6, 7)
    texts = _demo_texts()
    for text in texts:
        assert tok.encode(text) == reread.encode(text, add_special_tokens=False), repr(text)
    for messages in DEMO_CONVERSATIONS:
        assert tok.apply_chat_template(messages) == reread.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        rendered = demo.apply_chat_template(messages, tokenize=False)
        assert tok.apply_chat_template(messages, tokenize=False) == rendered
    if tokenizer_class == "PreTrainedTokenizerFast":  # the same tokenizer as the demo's own files
        for text in texts:
            assert tok.encode(text) == demo.encode(text), repr(text)
        for messages in DEMO_CONVERSATIONS:
            assert tok.apply_chat_template(messages) == demo.apply_chat_template(messages)
    ids = demo.encode("What is 457 + 68? héllo 🎉")
    assert tok.decode(ids) == demo.decode(ids) == "What is 457 + 68? héllo 🎉"
    # plain text that spells added tokens stays text (split by BPE here, letter by letter with
    # tokenizer.model; both decode to the text)
    plain = tok.encode("x <|end|> <think>5</think>")
    assert not set(plain) & {t.id for t in tok.added_tokens.values()}
    assert tok.decode(plain) == "x <|end|> <think>5</think>"
