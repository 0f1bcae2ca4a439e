"""The numerical ops of the JAX backend: joint attention (one switch per platform, sequence parallel), float32 norms.

Attention is chosen by one setting, `attention: auto|xla|cudnn|splash` (recipe key and CLI flag), resolved per
platform by `resolve_attention`: `auto` is cuDNN flash attention on GPU, the Pallas TPU splash kernel on TPU and XLA
on CPU. `auto` is also the models' default (`Attention()`), resolved when the model is traced, for the platform of
the mesh's devices (abstract TPU devices too), else this process's default backend, so a program compiled for a TPU
gets splash and a CPU test XLA. `Attention` runs the chosen kernel over a device mesh: Ulysses sequence parallelism,
where image tokens arrive split over `sequence` (and heads over `tensor`), one all-to-all trades the token split for
a head split, every device attends over all tokens for its own heads, and a second all-to-all trades back. The heads
are zero-padded to a multiple of sequence x tensor inside the attention only (38 heads become 40 at degree 4 or 8; a
zero head attends uniformly over zero values, contributes nothing and is sliced off). Mosaic (splash) kernels must
run inside `shard_map`, so on a mesh every kernel runs there (splash does even on one device).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from contentv_common.model.sequence_split import MESH_AXES, check_sequence_split, padded_heads

ATTENTION_CHOICES = ("auto", "xla", "cudnn", "splash")
PLATFORM_KERNELS = {"gpu": "cudnn", "tpu": "splash", "cpu": "xla"}
BATCH_AXES = ("data", "fsdp")
CUDNN_PAD_MULTIPLE = 128  # cuDNN's backward rejects odd lengths such as 33,093; padded keys are masked
SPLASH_BLOCK = 512  # splash tile (queries and keys) on TPU; the sequence is padded to a multiple, padded keys masked


def resolve_attention(name: str, platform: str) -> str:
    """The kernel that `name` means on `platform` ("cpu", "gpu" or "tpu"): "xla", "cudnn" or "splash".

    `splash` off TPU runs the Pallas kernel in interpret mode (slow; for parity tests); `cudnn` needs a GPU.
    """
    if name not in ATTENTION_CHOICES:
        raise ValueError(f"attention {name!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    if name == "auto":
        return PLATFORM_KERNELS.get(platform, "xla")
    if name == "cudnn" and platform != "gpu":
        raise ValueError(f"attention 'cudnn' needs a GPU, the platform is {platform!r}")
    return name


def mesh_platform(mesh: Mesh | None) -> str:
    """The platform the program is compiled for: the mesh's devices (abstract TPU devices too), else the default."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None = None, pad_multiple: int | None = None
) -> jax.Array:
    """Full bidirectional attention on one device, [B, N, heads, head_dim] in and out (BTNH, no transposes).

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


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int, interpret: bool) -> jax.Array:
    """Pallas TPU splash attention, [B, N, heads, d] in and out; call it inside `shard_map` (a Mosaic kernel).

    The sequence is padded to a multiple of `block`; segment ids keep real queries on real keys (padded queries see
    only padded keys, so no softmax row is empty). Splash does not scale the logits, so q is scaled here.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    precision = jax.config.jax_default_matmul_precision
    if not interpret and q.dtype != jnp.float32 and precision in ("highest", "float32"):
        raise ValueError(
            f"splash attention on TPU: {q.dtype} inputs under jax_default_matmul_precision={precision!r} (Mosaic "
            "rejects fp32-precision matmuls of bf16 operands); leave the precision at its default"
        )
    b, n, h, d = q.shape
    n_pad = n + (-n % block)
    pad = [(0, 0), (0, n_pad - n), (0, 0), (0, 0)]
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    q, k, v = (jnp.transpose(jnp.pad(t, pad), (0, 2, 1, 3)) for t in (q, k, v))  # [B, heads, N, d]
    # separate dq and dkv backward kernels: the fused one keeps an fp32 dq per key block (10x the temporaries at 41k)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = splash.MultiHeadMask([splash.FullMask((n_pad, n_pad)) for _ in range(h)])
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    segments = (jnp.arange(n_pad) >= n).astype(jnp.int32)
    ids = splash.SegmentIds(q=segments, kv=segments)
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)
    return jnp.transpose(out, (0, 2, 1, 3))[:, :n]


@dataclass(frozen=True)
class Attention:
    """Attention over image + text tokens with the chosen kernel on a mesh (hashable: a static model attribute).

    `kind` is "auto" (the default: resolved at trace time for the mesh's platform, see `resolved`) or a
    `resolve_attention` result; `mesh` None means one device. `block` is the splash tile and
    `pad_multiple` cuDNN's length multiple. Image tokens may be split over `sequence` (they must divide it: see
    contentv_common.model.sequence_split.check_sequence_split), text tokens are whole on every device.
    """

    kind: str = "auto"
    mesh: Mesh | None = None
    block: int = SPLASH_BLOCK
    pad_multiple: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_CHOICES:
            raise ValueError(f"attention kind {self.kind!r} is not one of {', '.join(ATTENTION_CHOICES)}")

    def resolved(self) -> Attention:
        """`auto` made concrete (the kernels of `attention_for`) for the platform the program is traced for: the mesh's
        devices, else this process's default backend; called at trace time, never at import."""
        if self.kind != "auto":
            return self
        return dataclasses.replace(self, kind=resolve_attention("auto", mesh_platform(self.mesh)))

    def local(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """One device's attention over [B, N, heads, d] with the chosen kernel."""
        if self.kind == "splash":
            return splash_attention(q, k, v, self.block, interpret=mesh_platform(self.mesh) != "tpu")
        if self.kind == "cudnn":
            return attention(q, k, v, "cudnn", self.pad_multiple or CUDNN_PAD_MULTIPLE)
        return attention(q, k, v, None, self.pad_multiple)

    def __call__(
        self, q: jax.Array, k: jax.Array, v: jax.Array, cq: jax.Array, ck: jax.Array, cv: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Image q/k/v [B, N, heads, d] and text cq/ck/cv [B, L, heads, d] -> (image out, text out), same shapes."""
        if self.kind == "auto":
            return self.resolved()(q, k, v, cq, ck, cv)
        mesh = self.mesh
        if mesh is None and self.kind != "splash":
            out = self.local(jnp.concatenate([q, cq], 1), jnp.concatenate([k, ck], 1), jnp.concatenate([v, cv], 1))
            return out[:, : q.shape[1]], out[:, q.shape[1] :]
        if mesh is None:  # splash on one device still needs shard_map
            mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), MESH_AXES)
        heads = q.shape[2]
        check_sequence_split(q.shape[1], cq.shape[1], heads, mesh)
        batch = q.shape[0]
        if batch % (mesh.shape["data"] * mesh.shape["fsdp"]):
            raise ValueError(
                f"attention batch {batch} does not split over mesh axes data x fsdp = "
                f"{mesh.shape['data']} x {mesh.shape['fsdp']}"
            )
        hp = padded_heads(heads, mesh.shape["sequence"], mesh.shape["tensor"])
        pad = [(0, 0), (0, 0), (0, hp - heads), (0, 0)]
        q, k, v, cq, ck, cv = (jnp.pad(t, pad) for t in (q, k, v, cq, ck, cv))
        image = PartitionSpec(BATCH_AXES, "sequence", "tensor", None)
        text = PartitionSpec(BATCH_AXES, None, ("tensor", "sequence"), None)
        body = partial(_ulysses, self.local, mesh.shape["sequence"] > 1)
        out, cout = jax.shard_map(
            body, mesh=mesh, in_specs=(image,) * 3 + (text,) * 3, out_specs=(image, text), check_vma=False
        )(q, k, v, cq, ck, cv)
        return out[:, :, :heads], cout[:, :, :heads]


DEFAULT_ATTENTION = Attention()  # "auto" on one device: the default of the models, resolved when traced


def attention_for(name: str, mesh: Mesh | None = None, **kwargs) -> Attention:
    """The `attention` setting (auto|xla|cudnn|splash) resolved for the mesh's platform (or this process's)."""
    return Attention(resolve_attention(name, mesh_platform(mesh)), mesh, **kwargs)


def _ulysses(local, split_tokens: bool, q, k, v, cq, ck, cv) -> tuple[jax.Array, jax.Array]:
    """Per device: image tokens split over `sequence` -> all-to-all -> all image tokens for heads / sequence, attend
    with the text tokens of the same heads, all-to-all back. Head order after the exchange is (tensor, sequence)."""
    if split_tokens:
        q, k, v = (jax.lax.all_to_all(t, "sequence", 2, 1, tiled=True) for t in (q, k, v))
    n = q.shape[1]
    out = local(jnp.concatenate([q, cq], 1), jnp.concatenate([k, ck], 1), jnp.concatenate([v, cv], 1))
    image, text = out[:, :n], out[:, n:]
    if split_tokens:
        image = jax.lax.all_to_all(image, "sequence", 1, 2, tiled=True)
    return image, text


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
