"""The JAX data step encodes on every local device (contentv_jax.encoders.local_mesh): clips one per device side by
side, the last group filled, and captions with the text encoders sharded; the same latents and embeddings as one
device, in fp32."""

import jax
import numpy as np

from contentv_common.data.synthetic import render
from contentv_jax.encoders import demo_encoders, local_mesh, tiny_encoders


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_clips_and_captions_on_the_local_devices_equal_one_device():
    mesh = local_mesh()
    assert mesh.size == jax.local_device_count() == 8
    clips = np.stack([render("circle", "red", d, 32, 32, 9, i) for i, d in enumerate(["left", "right", "up"] * 4)])
    clips = clips[:11]  # one group of 8, then 3 and 5 black fill clips
    one, spread = demo_encoders(), demo_encoders(mesh=mesh)
    assert {d for leaf in jax.tree.leaves(spread.vae) for d in leaf.devices()} == set(mesh.devices.flat)
    with jax.default_matmul_precision("highest"):
        expect = np.concatenate([one.encode_video(c[None]) for c in clips])
        got = spread.encode_video(clips)
    assert got.shape == expect.shape == (11, 16, 3, 4, 4)
    assert relative_error(got, expect) < 1e-5
    captions = [f"a red circle moving {d}" for d in ("left", "right", "up")]
    with jax.default_matmul_precision("highest"):
        text, pooled = tiny_encoders(mesh=mesh).encode_text(captions)
        text1, pooled1 = tiny_encoders().encode_text(captions)
    assert relative_error(text, text1) < 1e-5 and relative_error(pooled, pooled1) < 1e-5
