"""The numerical ops of the JAX backend: one attention function, float32 norms."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None = None, pad_multiple: int | None = None
) -> jax.Array:
    """Full bidirectional attention, [B, N, heads, head_dim] in and out (BTNH, no transposes).

    `implementation`: None lets XLA choose; "cudnn" selects cuDNN flash attention on GPU. `pad_multiple` pads the
    sequence to a multiple (cuDNN's backward rejects lengths such as 33,093) and masks the padded keys through
    `key_value_seq_lengths`, so the result equals the unpadded attention; the padded query rows are dropped.
    """
    n = q.shape[1]
    if not pad_multiple or n % pad_multiple == 0:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    pad = [(0, 0), (0, -n % pad_multiple), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
    lengths = jnp.full((q.shape[0],), n, dtype=jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)
    return out[:, :n]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32 (as diffusers does), result in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters, computed in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
