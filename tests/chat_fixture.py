"""A chat-capable tiny checkpoint for tests: the golden "tiny" weights (vocab 256) with a
sentencepiece tokenizer trained here (vocab 200) whose chat tokens are single pieces, and
<|end|> as the end-of-text token."""

import json
import shutil
from pathlib import Path

from conftest import golden_path

CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"]


def build_chat_model_dir(directory: Path) -> Path:
    import sentencepiece as spm
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(golden_path("tiny") / name, d / name)
    corpus = d / "corpus.txt"
    lines = [f"what is {a} plus {b}? the answer is {a + b}. <think> add the ones </think>"
             for a in range(40) for b in range(0, 40, 3)]
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=200,
                                   user_defined_symbols=CHAT_TOKENS, model_type="bpe", minloglevel=2,
                                   character_coverage=1.0)
    corpus.unlink()
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    end = sp.piece_to_id("<|end|>")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [end]}))
    return d
