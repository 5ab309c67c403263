"""mlx-lm's model helpers, under the name ``phi4flash.py`` imports them by (``.base``), so the model
file reads the same here as inside ``mlx_lm/models/``."""

from mlx_lm.models.base import (  # noqa: F401
    BaseModelArgs,
    create_attention_mask,
    create_causal_mask,
    create_ssm_mask,
    scaled_dot_product_attention,
)
