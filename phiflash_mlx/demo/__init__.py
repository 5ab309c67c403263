"""A small demo model shipped with the package: a SambaY network trained on arithmetic word problems.

    import phiflash_mlx
    from phiflash_mlx.demo import demo_model_path
    model, tokenizer = phiflash_mlx.load(demo_model_path())
    print(phiflash_mlx.generate(model, tokenizer, [{"role": "user", "content": "What is 457 + 68?"}], temp=0))

It has every layer kind of the released model (Mamba, sliding-window and full differential attention,
the memory-producing Mamba, a GMU and a cross-attention layer) at toy size, so chat works offline.
``tasks`` makes the problems, ``train`` retrains it, ``evaluate`` measures it; see README.md here.
"""

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"


def demo_model_path() -> Path:
    """The directory of the shipped demo checkpoint (config.json, model.safetensors, tokenizer files)."""
    from ..errors import PhiflashError

    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise PhiflashError(f"the demo model is missing from {DEMO_MODEL_DIR}; reinstall phiflash-mlx or "
                            "retrain it with: python -m phiflash_mlx.demo.train")
    return DEMO_MODEL_DIR


__all__ = ["DEMO_MODEL_DIR", "demo_model_path"]
