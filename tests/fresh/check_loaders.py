"""Load every public model of one backend from the fp32 and bf16 folders of `checkpoints.write_all`, one forward each.

    python tests/fresh/blocked.py jax,flax,optax,orbax tests/fresh/check_loaders.py torch ROOT OUT.npz

Writes the outputs as float32 to OUT.npz, keyed `<model>/<folder precision>/<parameter dtype>` (the transformer also
from an fp16 folder): the test compares them. Run under blocked.py so that the other framework cannot be imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

PROMPTS = ["a red cat", "blue dog"]
# parameter dtypes per folder precision: the fp32 folder in fp32 is the reference of both bf16 loads
VARIANTS = {"fp32": ("float32",), "bf16": ("float32", "bfloat16")}
TRANSFORMER_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "pooled_projections")


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "hidden_states": rng.standard_normal((1, 16, 1, 8, 8), dtype=np.float32),
        "timestep": np.array([500.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((1, 7, 48), dtype=np.float32),
        "pooled_projections": rng.standard_normal((1, 24), dtype=np.float32),
        "latents": rng.standard_normal((1, 16, 1, 4, 4), dtype=np.float32),
        "frames": rng.uniform(0, 1, (2, 40, 48, 3)).astype(np.float32),
    }


def run_torch(root: Path, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch

    import contentv_torch_npu
    from contentv_torch_npu.reward.clip import load_clip_reward

    torch.backends.cuda.matmul.allow_tf32 = False
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    out = {}
    with torch.no_grad():
        for src in ("fp32", "bf16"):
            for name in VARIANTS[src]:
                dtype = getattr(torch, name)
                model = contentv_torch_npu.load_transformer(root / f"transformer_{src}", dtype=dtype).eval()
                assert model.proj_out.weight.dtype == dtype
                out[f"transformer/{src}/{name}"] = model(*(t[k] for k in TRANSFORMER_INPUTS)).float().numpy()
                vae = contentv_torch_npu.load_vae(root / f"vae_{src}", dtype=dtype)
                out[f"vae/{src}/{name}"] = vae.decode(t["latents"]).float().numpy()
            reward = load_clip_reward(root / f"clip_{src}")
            out[f"clip/{src}/float32"] = reward.score_tokens(t["frames"], reward.tokenize(PROMPTS)).numpy()
        model = contentv_torch_npu.load_transformer(root / "transformer_fp16").eval()
        out["transformer/fp16/float32"] = model(*(t[k] for k in TRANSFORMER_INPUTS)).numpy()
    return out


def run_jax(root: Path, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp

    import contentv_jax
    from contentv_jax.reward.clip import load_clip_reward

    jax.config.update("jax_default_matmul_precision", "highest")
    j = {k: jnp.asarray(v) for k, v in x.items()}
    out = {}
    for src in ("fp32", "bf16"):
        for name in VARIANTS[src]:
            model = contentv_jax.load_transformer(root / f"transformer_{src}", dtype=jnp.dtype(name))
            assert model.proj_out.kernel.dtype == jnp.dtype(name)
            out[f"transformer/{src}/{name}"] = np.asarray(model(*(j[k] for k in TRANSFORMER_INPUTS)), np.float32)
            vae = contentv_jax.load_vae(root / f"vae_{src}", dtype=jnp.dtype(name))
            out[f"vae/{src}/{name}"] = np.asarray(vae.decode(j["latents"]), np.float32)
        reward = load_clip_reward(root / f"clip_{src}")
        out[f"clip/{src}/float32"] = np.asarray(reward.score_tokens(j["frames"], reward.tokenize(PROMPTS)))
    model = contentv_jax.load_transformer(root / "transformer_fp16")
    out["transformer/fp16/float32"] = np.asarray(model(*(j[k] for k in TRANSFORMER_INPUTS)))
    return out


def main(argv: list[str]) -> int:
    backend, root, dest = argv[0], Path(argv[1]), Path(argv[2])
    out = (run_torch if backend == "torch" else run_jax)(root, inputs())
    np.savez(dest, **out)
    print(f"{backend}: {len(out)} outputs -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
