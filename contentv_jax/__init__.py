"""ContentV-X reference core in JAX/Flax NNX."""

from contentv_jax.loading import load_transformer, save_jax
from contentv_jax.text_encoders import load_text_encoders
from contentv_jax.transformer import Transformer
from contentv_jax.vae import WanVAE, load_vae, save_vae

__all__ = ["Transformer", "WanVAE", "load_vae", "save_vae", "load_transformer", "save_jax", "load_text_encoders"]
