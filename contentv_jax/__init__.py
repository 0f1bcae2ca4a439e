"""ContentV-X reference core in JAX/Flax NNX."""

from contentv_jax.loading import load_transformer, save_jax
from contentv_jax.transformer import Transformer

__all__ = ["Transformer", "load_transformer", "save_jax"]
