"""The tensors a phi4flash checkpoint must hold, with their shapes (SAMBAY.md section 3)."""

from __future__ import annotations

from .config import CROSS, GLOBAL, GMU, MAMBA, MAMBA_MEM, SWA, Config

# Kept in float32 by the original (SAMBAY.md 3.7); everything else is stored as bf16 in the release.
FP32_IN_ORIGINAL = ("A_log", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def expected_tensors(cfg: Config) -> dict[str, tuple]:
    """Every tensor name (Hugging Face naming) and its shape. `lm_head.weight` is tied, so absent."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    Di, ds, K, R = cfg.d_inner, cfg.mamba_d_state, cfg.mamba_d_conv, cfg.dt_rank
    shapes = {
        "model.embed_tokens.weight": (V, H),
        "model.final_layernorm.weight": (H,),
        "model.final_layernorm.bias": (H,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    for i, kind in enumerate(cfg.layer_kinds):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "input_layernorm.bias": (H,),
            p + "post_attention_layernorm.weight": (H,), p + "post_attention_layernorm.bias": (H,),
            p + "mlp.fc1.weight": (2 * I, H), p + "mlp.fc2.weight": (H, I),
        })
        a = p + "attn."
        if kind in (MAMBA, MAMBA_MEM):                                  # 3.3
            shapes.update({
                a + "in_proj.weight": (2 * Di, H),
                a + "conv1d.weight": (Di, 1, K), a + "conv1d.bias": (Di,),
                a + "x_proj.weight": (R + 2 * ds, Di),
                a + "dt_proj.weight": (Di, R), a + "dt_proj.bias": (Di,),
                a + "A_log": (Di, ds), a + "D": (Di,),
                a + "out_proj.weight": (H, Di),
            })
        elif kind == GMU:                                               # 3.4
            shapes.update({a + "in_proj.weight": (Di, H), a + "out_proj.weight": (H, Di)})
        else:                                                           # 3.5, 3.6
            rows = nh * hd if kind == CROSS else (nh + 2 * nkv) * hd
            assert kind in (SWA, GLOBAL, CROSS)
            shapes.update({
                a + "Wqkv.weight": (rows, H), a + "Wqkv.bias": (rows,),
                a + "out_proj.weight": (H, nh * hd), a + "out_proj.bias": (H,),
                a + "inner_cross_attn.subln.weight": (2 * hd,),
            })
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                shapes[a + "inner_cross_attn." + name] = (hd,)
    return shapes
