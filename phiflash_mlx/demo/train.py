"""Train the demo model: a small SambaY (phi4flash) network that solves arithmetic word problems.

    python -m phiflash_mlx.demo.train                       # writes phiflash_mlx/demo/model/
    python -m phiflash_mlx.demo.train --out /tmp/demo --steps 200

Everything is seeded: the tokenizer corpus, the training problems, the initial weights and the batch
order, so the same command on the same software gives the same checkpoint. Training runs through
``phiflash_mlx.models.phi4flash.Model`` itself (``nn.value_and_grad`` and AdamW inside one
``mx.compile``d step over fixed-shape batches). The result is an ordinary Hugging Face-format
checkpoint directory: config.json, model.safetensors (bf16), tokenizer.model (sentencepiece),
tokenizer_config.json and generation_config.json.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

# One BLAS thread: with several, OpenBLAS threads spin against each other and against MLX's own
# workers, and a training step on a 2-core machine runs several times slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import phiflash_mlx  # noqa: F401  (sets up the fast BLAS before mlx.core is imported)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ..models.phi4flash import Model, ModelArgs
from ..tokenizer import PHI_CHAT_TEMPLATE, AddedToken, load_tokenizer, sentencepiece_tokenizer_json
from . import tasks

CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"]
SPECIAL_PIECES = CHAT_TOKENS + [tasks.THINK_OPEN, tasks.THINK_CLOSE]
DEFAULT_OUT = Path(__file__).resolve().parent / "model"

# 8 layers: Mamba, SWA, Mamba, SWA, Mamba (memory), global attention, GMU, cross attention.
MODEL_CONFIG = {
    "architectures": ["Phi4FlashForCausalLM"],
    "model_type": "phi4flash",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "sliding_window": 32,
    "layer_norm_eps": 1e-5,
    "mamba_d_state": 4,
    "mamba_d_conv": 4,
    "mamba_expand": 1,
    "mb_per_layer": 2,
    "tie_word_embeddings": True,
    "max_position_embeddings": 512,
    "torch_dtype": "bfloat16",
}


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def train_tokenizer(out: Path, seed: int, vocab_size: int = 640) -> None:
    """A sentencepiece BPE model over the task's text: digits are single pieces, the chat tokens and
    the think tags are user-defined pieces, and unseen characters fall back to bytes."""
    import sentencepiece as spm

    corpus = out / "tokenizer_corpus.txt"
    lines = []
    for p in tasks.problems(6000, seed=seed + 1):
        lines += [p.question, p.trace, str(p.answer)]
    corpus.write_text("\n".join(lines), encoding="utf-8")
    try:
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", user_defined_symbols=SPECIAL_PIECES, split_digits=True,
            byte_fallback=True, character_coverage=1.0, add_dummy_prefix=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
            hard_vocab_limit=False, seed_sentencepiece_size=100000, input_sentence_size=0,
            shuffle_input_sentence=False)
    finally:
        corpus.unlink(missing_ok=True)
    (out / "tokenizer.vocab").unlink(missing_ok=True)


def write_tokenizer_files(out: Path) -> None:
    """tokenizer_config.json (with the chat template), generation_config.json and tokenizer.json: the
    Hugging Face form of tokenizer.model, so transformers and mlx-lm tokenize and frame chats as we do."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    ids = {t: sp.piece_to_id(t) for t in SPECIAL_PIECES}
    added = {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": t in ("<|end|>",),
                           "single_word": False, "special": t in CHAT_TOKENS}
             for t in SPECIAL_PIECES}
    config = {
        # tokenizer.json as written (LlamaTokenizer would replace its normalizer and dummy-prefix rule)
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "chat_template": PHI_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    flags = {e["content"]: AddedToken(e["content"], int(i), e["special"], rstrip=e["rstrip"], lstrip=e["lstrip"])
             for i, e in added.items()}
    hf_json = sentencepiece_tokenizer_json(out / "tokenizer.model", flags)
    (out / "tokenizer.json").write_text(json.dumps(hf_json, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    generation = {"eos_token_id": [ids["<|end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
                  "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def encode_example(tokenizer, problem: tasks.Problem) -> tuple[list[int], int]:
    """(ids, n_prompt): the prompt exactly as generation renders it, then the response and <|end|>."""
    prompt = list(tokenizer.apply_chat_template(problem.messages, add_generation_prompt=True))
    end = tokenizer.added_tokens["<|end|>"].id
    response = tokenizer.encode(problem.response, allow_special=True) + [end]
    return prompt + response, len(prompt)


def make_batch(tokenizer, rng: random.Random, batch: int, length: int, max_digits: int = 3, weights=None):
    """Inputs, targets and loss mask (batch, l): right-padded to the longest example rounded up to a
    multiple of 8 (at most `length`); the loss covers the response and its <|end|>."""
    pad = tokenizer.added_tokens["<|endoftext|>"].id
    examples = []
    while len(examples) < batch:
        ids, n_prompt = encode_example(tokenizer, tasks.sample(rng, max_digits=max_digits, weights=weights))
        if len(ids) <= length + 1:                     # longer ones: draw another
            examples.append((ids, n_prompt))
    width = min(length, -(-max(len(ids) - 1 for ids, _ in examples) // 8) * 8)
    x = np.full((batch, width), pad, np.int32)
    y = np.full((batch, width), pad, np.int32)
    m = np.zeros((batch, width), np.float32)
    for i, (ids, n_prompt) in enumerate(examples):
        x[i, :len(ids) - 1] = ids[:-1]
        y[i, :len(ids) - 1] = ids[1:]
        m[i, n_prompt - 1:len(ids) - 1] = 1.0
    return mx.array(x), mx.array(y), mx.array(m)


# ---------------------------------------------------------------------------------------------
# Model and checkpoint
# ---------------------------------------------------------------------------------------------

def init_model(config: dict, seed: int) -> Model:
    """A freshly initialised model with SambaY-style Mamba initialisation (A = 1..n, dt bias so that
    softplus(dt) lies in [1e-3, 1e-1]) and small embeddings."""
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    rng = np.random.default_rng(seed)
    n = config["mamba_d_state"]
    params = {}
    for name, w in tree_flatten(model.parameters()):
        if name.endswith("A_log"):
            params[name] = mx.array(np.log(np.tile(np.arange(1, n + 1, dtype=np.float32), (w.shape[0], 1))))
        elif name.endswith("dt_proj.bias"):
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), w.shape)).astype(np.float32)
            params[name] = mx.array(dt + np.log(-np.expm1(-dt)))           # inverse softplus
        elif name.endswith("embed_tokens.weight"):
            params[name] = mx.array(rng.normal(0, 0.02, w.shape).astype(np.float32))
        elif "lambda_" in name:
            params[name] = mx.array(rng.normal(0, 0.1, w.shape).astype(np.float32))
    model.load_weights(list(params.items()), strict=False)
    mx.eval(model.parameters())
    return model


def hf_tensors(model: Model) -> dict[str, np.ndarray]:
    """The parameters under Hugging Face names and layouts (conv1d weight back to (Di, 1, K))."""
    out = {}
    for name, w in tree_flatten(model.parameters()):
        a = np.array(w.astype(mx.float32))
        if name.endswith("conv1d.weight"):
            a = a.transpose(0, 2, 1)
        out[name] = a
    return out


def save_checkpoint(model: Model, config: dict, out: Path, metadata: dict | None = None) -> None:
    """config.json and model.safetensors; A_log, D and the λ vectors stay float32, the rest bf16."""
    from reference import write_safetensors

    tensors = hf_tensors(model)
    bf16 = [k for k in tensors if not (k.endswith(("A_log", ".D")) or "lambda_" in k)]
    full = dict(config, vocab_size=model.args.vocab_size)
    special = json.loads((out / "generation_config.json").read_text())
    full.update(eos_token_id=special["eos_token_id"][-1], pad_token_id=special["pad_token_id"], bos_token_id=None)
    (out / "config.json").write_text(json.dumps(full, indent=2) + "\n")
    write_safetensors(str(out / "model.safetensors"), tensors, bf16_names=bf16,
                      metadata={"format": "pt", **(metadata or {})})


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def forward(model: Model, x: mx.array) -> mx.array:
    """Logits of a training batch. Calls the network below ``Model.__call__``, whose check of the
    prompt ids reads values back and so cannot run inside ``mx.compile``; the ids here are ours."""
    h = model.model(x)
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


def fake_quantize(w: mx.array, bits: int, group_size: int) -> mx.array:
    """w as `bits`-bit affine quantization in groups would give it back, with the gradient of the
    identity (straight-through): training sees the rounding, the optimizer still moves w smoothly."""
    if w.shape[-1] % group_size:
        return w
    q = mx.dequantize(*mx.quantize(w, group_size=group_size, bits=bits), group_size=group_size, bits=bits)
    return w + mx.stop_gradient(q - w)


@contextmanager
def quantization_aware(bits: int | None, group_size: int = 64):
    """Within the block, linear and embedding layers compute with fake-quantized weights (the layers
    `phiflash convert -q` quantizes), so training makes the model robust to that quantization."""
    if not bits:
        yield
        return
    originals = (nn.Linear.__call__, nn.Embedding.__call__, nn.Embedding.as_linear)

    def linear(self, x):
        y = x @ fake_quantize(self["weight"], bits, group_size).T
        return y + self["bias"] if "bias" in self else y

    def embed(self, x):
        return fake_quantize(self["weight"], bits, group_size)[x]

    def as_linear(self, x):
        return x @ fake_quantize(self["weight"], bits, group_size).T

    nn.Linear.__call__, nn.Embedding.__call__, nn.Embedding.as_linear = linear, embed, as_linear
    try:
        yield
    finally:
        nn.Linear.__call__, nn.Embedding.__call__, nn.Embedding.as_linear = originals


def loss_fn(model, x, y, m):
    logits = forward(model, x)
    ce = nn.losses.cross_entropy(logits, y, reduction="none")
    return (ce * m).sum() / mx.maximum(m.sum(), 1.0)


def train(out: Path, steps: int = 900, batch: int = 32, length: int = 88, lr: float = 4e-3,
          warmup: int = 60, seed: int = 0, log_every: int = 100, config: dict | None = None,
          log=print, save_every: int = 0, init: Path | None = None, weights=None, qat_bits: int | None = None,
          qat_mix: float = 0.0) -> dict:
    """Train and write the checkpoint to `out`; returns a summary (steps, time, final loss)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config or MODEL_CONFIG)
    t_start = time.perf_counter()
    if init is not None and Path(init).resolve() != out.resolve():
        import shutil                                  # keep the ids the weights were trained with
        shutil.copy(Path(init) / "tokenizer.model", out / "tokenizer.model")
    elif init is None:
        train_tokenizer(out, seed)
    write_tokenizer_files(out)
    tokenizer = load_tokenizer(out)
    config["vocab_size"] = tokenizer.vocab_size
    model = init_model(config, seed)
    if init is not None:                               # continue from a checkpoint of the same shape
        from ..loader import load_weights
        model.load_weights(list(model.sanitize(load_weights(Path(init))).items()), strict=True)
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    log(f"model: {n_params / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size}, "
        f"layers {model.args.layer_kinds}")

    schedule = optim.join_schedules(
        [optim.linear_schedule(lr / 100, lr, max(warmup, 1)),
         optim.cosine_decay(lr, max(steps - warmup, 1), lr / 50)], [max(warmup, 1)])
    optimizer = optim.AdamW(learning_rate=schedule, betas=(0.9, 0.98), weight_decay=0.01)
    state = [model.state, optimizer.state]
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    # Not mx.compile'd: on the CPU the compiled step (the scan unrolled into one graph) measured
    # slower than eager evaluation, and it needs fixed shapes where eager steps can pad per batch.
    # With qat_mix > 0 the objective is qat_mix * (loss of the float weights) + (1 - qat_mix) * (loss
    # of their fake-quantized copy): one set of weights that works both unquantized and quantized.
    def step(x, y, m):
        with quantization_aware(qat_bits):
            loss, grads = loss_and_grad(model, x, y, m)
        if qat_bits and qat_mix > 0:
            loss_f, grads_f = loss_and_grad(model, x, y, m)
            loss = qat_mix * loss_f + (1 - qat_mix) * loss
            grads = tree_map(lambda gf, gq: qat_mix * gf + (1 - qat_mix) * gq, grads_f, grads)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    rng = random.Random(seed + 2)
    running, t0 = None, time.perf_counter()
    for i in range(1, steps + 1):
        x, y, m = make_batch(tokenizer, rng, batch, length, weights=weights)
        loss = step(x, y, m)
        mx.eval(state, loss)
        loss = loss.item()
        running = loss if running is None else 0.95 * running + 0.05 * loss
        if i % log_every == 0 or i == steps:
            dt = time.perf_counter() - t0
            log(f"step {i}/{steps}  loss {running:.4f}  lr {schedule(optimizer.step).item():.2e}  "
                f"{i / dt:.2f} steps/s  {dt / 60:.1f} min")
        if save_every and i % save_every == 0 and i < steps:
            save_checkpoint(model, config, out, {"step": str(i)})
            log(f"saved the step-{i} weights to {out}")
    wall = time.perf_counter() - t_start
    summary = {"steps": steps, "batch": batch, "length": length, "lr": lr, "warmup": warmup, "seed": seed,
               **({"init": str(init), "weights": list(weights) if weights else None} if init is not None else {}),
               **({"qat_bits": qat_bits, "qat_mix": qat_mix} if qat_bits else {}),
               "final_loss": round(running, 5), "train_minutes": round(wall / 60, 1)}
    save_checkpoint(model, config, out, {k: str(v) for k, v in summary.items()})
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"wrote {out} in {wall / 60:.1f} min")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m phiflash_mlx.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"checkpoint directory (default {DEFAULT_OUT})")
    p.add_argument("--steps", type=int, default=900, help="optimizer steps (default 900)")
    p.add_argument("--batch", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--length", type=int, default=88, help="padded sequence length (default 88)")
    p.add_argument("--lr", type=float, default=4e-3, help="peak learning rate (default 4e-3)")
    p.add_argument("--warmup", type=int, default=60, help="linear warm-up steps (default 60)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    p.add_argument("--log-every", type=int, default=100, help="print the loss every N steps")
    p.add_argument("--save-every", type=int, default=0,
                   help="also write the checkpoint every N steps (default 0: only at the end)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this checkpoint's weights instead of a fresh initialisation")
    p.add_argument("--weights", default=None,
                   help="relative frequency of add,sub,mul problems, e.g. 1,1,3 (default: equal)")
    p.add_argument("--qat-bits", type=int, default=None,
                   help="train with weights fake-quantized to this many bits (groups of 64), so the "
                        "`phiflash convert -q` copy loses little")
    p.add_argument("--qat-mix", type=float, default=0.0,
                   help="with --qat-bits: weight of the unquantized model's loss in the objective, 0-1 "
                        "(default 0: only the quantized copy's loss); 0.5 keeps both accurate")
    args = p.parse_args(argv)
    if not 0.0 <= args.qat_mix <= 1.0:
        p.error("--qat-mix must be between 0 and 1")
    if args.qat_mix and not args.qat_bits:
        p.error("--qat-mix needs --qat-bits")
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    if weights is not None and len(weights) != len(tasks.KINDS):
        p.error(f"--weights needs {len(tasks.KINDS)} numbers (add,sub,mul)")
    train(args.out, args.steps, args.batch, args.length, args.lr, args.warmup, args.seed, args.log_every,
          log=lambda s: print(s, flush=True), save_every=args.save_every, init=args.init, weights=weights,
          qat_bits=args.qat_bits, qat_mix=args.qat_mix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
