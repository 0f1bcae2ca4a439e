"""The attention switch: per-platform choice, the Pallas splash kernel equal to XLA (interpret mode on CPU, odd
lengths, also sequence-parallel inside shard_map), and the splash path compiling for a real TPU topology."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from contentv_common.config.recipe import MeshConfig
from contentv_jax.ops import Attention, attention_for, resolve_attention
from contentv_jax.sharding import make_mesh

HEADS, HEAD_DIM, TEXT = 38, 8, 333  # ContentV's heads and text tokens, a narrow head


def _qkv(image_tokens: int, batch: int = 2, seed: int = 0) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    shapes = [(batch, image_tokens, HEADS, HEAD_DIM)] * 3 + [(batch, TEXT, HEADS, HEAD_DIM)] * 3
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def _value_and_grads(att: Attention, args: list[jax.Array]):
    def loss(*a):
        out, text_out = att(*a)
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(text_out))

    return jax.jit(lambda *a: (att(*a), jax.grad(loss, argnums=tuple(range(6)))(*a)))(*args)


def test_auto_picks_the_platform_kernel():
    assert [resolve_attention("auto", p) for p in ("cpu", "gpu", "tpu")] == ["xla", "cudnn", "splash"]
    assert resolve_attention("splash", "cpu") == "splash"  # Pallas interpret mode: parity tests
    assert resolve_attention("xla", "tpu") == "xla"
    with pytest.raises(ValueError, match="'cudnn' needs a GPU"):
        resolve_attention("cudnn", "cpu")
    with pytest.raises(ValueError, match="not one of auto, xla, cudnn, splash"):
        resolve_attention("flash", "gpu")
    assert attention_for("auto").kind == "xla"  # this CPU process


def test_splash_equals_xla_at_odd_lengths(rel_err):
    """333 text + 21 image tokens (354, padded to 384 with masked keys): outputs and gradients equal XLA's."""
    args = _qkv(21)
    (ref, ref_text), ref_grads = _value_and_grads(Attention("xla"), args)
    (out, out_text), grads = _value_and_grads(Attention("splash", block=128), args)
    assert rel_err(out, ref) < 1e-5 and rel_err(out_text, ref_text) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) < 1e-5


@pytest.fixture(scope="module")
def one_device():
    """(inputs, XLA's outputs and gradients on one device) at 24 image tokens, the reference of every mesh."""
    args = _qkv(24)
    return args, *_value_and_grads(Attention("xla"), args)


@pytest.mark.parametrize("kind", ["xla", "splash"])
def test_sequence_parallel_attention_equals_one_device(kind, one_device, rel_err):
    """Ulysses over sequence 4 x tensor 2 (38 heads padded to 40 inside), the kernel inside shard_map."""
    args, (ref, ref_text), ref_grads = one_device
    mesh = make_mesh(MeshConfig(1, 1, 4, 2), jax.devices()[:8])
    (out, out_text), grads = _value_and_grads(Attention(kind, mesh, block=128), args)
    assert rel_err(out, ref) < 1e-5 and rel_err(out_text, ref_text) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) < 1e-5


@pytest.mark.slow
def test_splash_compiles_for_a_tpu_topology(monkeypatch):
    """Lower + compile a sequence-parallel splash step for v5p:2x2x2 on this CPU machine (abstract TPU devices):
    the Mosaic kernel is in the program and no [N, N] score block is materialised. Needs libtpu (the README's test
    command installs the .[tpu] extra), so it runs in CI rather than skipping."""
    from jax.experimental import topologies

    assert importlib.util.find_spec("libtpu"), "libtpu is not installed: install the .[tpu] extra (README: Tests)"
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: other processes may hold libtpu's lock
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices
    mesh = make_mesh(MeshConfig(1, 1, 4, 2), devices)
    n, d, batch = 4096, 64, 1
    image = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "sequence", "tensor", None))
    text = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None, None))
    args = [jax.ShapeDtypeStruct((batch, n, HEADS, d), jnp.bfloat16, sharding=image)] * 3
    args += [jax.ShapeDtypeStruct((batch, TEXT, HEADS, d), jnp.bfloat16, sharding=text)] * 3
    att = attention_for("auto", mesh)
    assert att.kind == "splash"

    def loss(*a):
        out, text_out = att(*a)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(text_out.astype(jnp.float32))

    step = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
    with pytest.raises(ValueError, match="leave the precision at its default"):
        step.lower(*args)  # the tests run at "highest"; Mosaic would fail on bf16 operands
    with jax.default_matmul_precision("default"):
        compiled = step.lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text()
    temp = compiled.memory_analysis().temp_size_in_bytes
    heads_per_device = 40 // 8
    scores = batch * heads_per_device * (n + TEXT) ** 2 * 4  # one fp32 [N, N] block per local head
    assert 0 < temp < scores / 4, (temp, scores)


def _library_sample_program(devices) -> str:
    """The sampler step (CFG pair, 64x64x5 video, 333 text tokens) of the narrow model (38 heads, 2 blocks) as
    load_transformer builds it, the library's default attention, lowered for `devices`' platform."""
    from contentv_common.config.model import named_model_config
    from contentv_common.config.recipe import BucketConfig
    from contentv_jax.loading import abstract_transformer
    from contentv_jax.memory_plan import placed_as_loaded, sample_step_inputs
    from contentv_jax.sampling import denoise_step
    from tests.narrow_model import NARROW

    cfg = named_model_config("tiny").replace(**NARROW)
    mesh = make_mesh(MeshConfig(), devices)
    model = abstract_transformer(cfg, mesh, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    graphdef, state = placed_as_loaded(model, mesh)
    inputs = sample_step_inputs(cfg, mesh, BucketConfig(64, 64, 5, 1), TEXT)
    with jax.default_matmul_precision("default"):  # Mosaic refuses bf16 operands at fp32 precision
        return denoise_step(graphdef, True).lower(state, *inputs).as_text()


def test_library_default_attention_is_resolved_for_the_compile_target(monkeypatch):
    """`Transformer(...)` and `load_transformer(...)` default to attention "auto", resolved when traced for the
    platform compiled for: lowered for one v5p chip (tpu:v5p:2x2x1, first device) the sampler step runs splash (the
    Mosaic custom call), lowered for this CPU it runs XLA's attention (no custom call)."""
    from jax.experimental import topologies

    assert importlib.util.find_spec("libtpu"), "libtpu is not installed: install the .[tpu] extra (README: Tests)"
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is opened: other processes may hold libtpu's lock
    from contentv_common.config.model import named_model_config
    from contentv_jax.transformer import Transformer

    built = nnx.eval_shape(lambda: Transformer(named_model_config("tiny"), rngs=nnx.Rngs(0)))
    assert built.last_block.attn.attention == Attention("auto")
    assert Attention().resolved().kind == "xla"  # this CPU process
    chip = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices[:1]
    assert Attention(mesh=make_mesh(MeshConfig(), chip)).resolved().kind == "splash"
    assert "tpu_custom_call" in _library_sample_program(chip)
    assert "custom_call" not in _library_sample_program(jax.devices()[:1])
