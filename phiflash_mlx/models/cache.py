"""The model's caches are mlx-lm's own classes (``.cache`` for ``phi4flash.py``, as inside
``mlx_lm/models/``), so mlx-lm's prompt-cache files, batching and KV quantization work on them.

Per layer 0..h+1 (SAMBAY.md 5.1): ``ArraysCache(2)`` [conv_state, ssm_state] for the Mamba layers,
``RotatingKVCache(W)`` (exactly the last W positions) for the sliding-window layers and ``KVCache``
for the full-attention layer whose keys and values the cross layers read. Keys and values are in
the pair layout described in ``phi4flash.py``.
"""

from mlx_lm.models.cache import (  # noqa: F401
    ArraysCache,
    BatchKVCache,
    BatchRotatingKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)
