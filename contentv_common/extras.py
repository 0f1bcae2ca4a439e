"""Which pip extra provides a missing backend package, so a CLI ends with one line naming it (exit status 2).

Each backend runs alone (the JAX core has its own Flax text encoders and Wan VAE); what needs the other framework
(parity against torch, SD3's 2D image VAE, `--noise torch`) ends in one line naming its extra.
"""

from __future__ import annotations

EXTRA_OF = {
    "torch": "torch",
    "torchvision": "torch",
    "diffusers": "torch",
    "transformers": "torch",
    "sentencepiece": "torch",
    "jax": "jax",
    "jaxlib": "jax",
    "flax": "jax",
    "optax": "jax",
    "orbax": "jax",
    "grain": "jax",
}


def missing_extra(error: ImportError) -> str | None:
    """A one-line message naming the extra that provides the package `error` failed to import, else None."""
    root = (error.name or "").partition(".")[0]
    extra = EXTRA_OF.get(root)
    if extra is None:
        return None
    return f'this needs {root}, which is not installed: pip install -e ".[{extra}]"'
