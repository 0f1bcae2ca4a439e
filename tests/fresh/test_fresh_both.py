"""The two backends' fresh-process loader outputs agree (needs both frameworks, so not run in the one-extra venvs)."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("jax", "torch")), reason="needs both frameworks"
)


@pytest.mark.slow
def test_backends_agree_on_bf16_and_fp32_folders(torch_outputs, jax_outputs, rel_err):
    """fp32 compute: JAX and torch agree to float32 precision on both folders; bf16 compute within bf16 rounding."""
    assert torch_outputs.keys() == jax_outputs.keys()
    for key, value in torch_outputs.items():
        assert rel_err(jax_outputs[key], value) < (1e-5 if key.endswith("float32") else 4e-2), key
