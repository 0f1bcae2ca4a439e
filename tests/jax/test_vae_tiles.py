"""The JAX Wan VAE's tiled decode spread over 8 (fake CPU) devices: the same frames as one device decoding the same
tiles, and within the tiling's measured tolerance of the whole decode (the demo's trained VAE, diffusers' default
256/192-pixel tiles, normalised latents drawn as the sampler draws them; docs/scale.md gives the figures)."""

import jax
import numpy as np
import pytest

from contentv_common.demo import DEMO_VAE
from contentv_common.vae.chunks import Tiling
from contentv_jax import vae as jvae
from contentv_jax.sampling import decode_latents

pytestmark = pytest.mark.slow  # compiles the VAE for 2 tile shapes, 2 chunk programs each, on 1 and 8 devices

# 2 latent frames (the causal history crosses a chunk) of 8 x 40: one row of 3 tiles, 2 shapes (32 and 16 wide)
LATENTS = np.random.default_rng(0).standard_normal((1, 16, 2, 8, 40)).astype(np.float32)
MAX_LEVELS, MAX_REL = 24, 8e-3  # measured here: 15 uint8 levels, 4.4e-3 relative


@pytest.fixture(scope="module")
def decoded():
    assert len(jax.devices()) == 8
    vae, tiling = jvae.load_vae(DEMO_VAE), Tiling()
    raw = np.asarray(vae.denormalize(LATENTS))
    first = LATENTS[:, :, :1]
    return dict(
        one=np.asarray(vae.decode(raw, tiling)),
        eight=np.asarray(vae.decode(raw, tiling, jax.devices())),
        whole=np.asarray(vae.decode(raw[:, :, :1])),  # one latent frame: one program fewer to compile
        whole_uint8=decode_latents(vae, first),
        tiled_uint8=decode_latents(vae, first, tiling),  # over all 8 devices by default
    )


def test_tiles_over_eight_devices_equal_one_device(decoded):
    assert decoded["eight"].shape == (1, 3, 5, 64, 320)
    np.testing.assert_array_equal(decoded["eight"], decoded["one"])


def test_tiled_decode_is_within_the_tilings_tolerance(decoded, rel_err):
    whole, tiled = decoded["whole"], decoded["one"][:, :, :1]
    levels = np.abs(decoded["tiled_uint8"].astype(int) - decoded["whole_uint8"].astype(int))
    assert levels.max() > 0  # the tiles really differ from the whole decode, so the bounds below can fail
    assert levels.max() <= MAX_LEVELS and rel_err(tiled, whole) < MAX_REL


def test_sample_cli_vae_tiling_decodes_in_tiles(decoded):
    """tools/sample.py --vae-tiling: the CLI's decoder (demo encoders) gives the tiled frames."""
    from contentv_common.backend import get
    from contentv_common.cli.sample import build_parser, latent_decoder

    assert build_parser().parse_args(["--vae-tiling"]).vae_tiling
    decode = latent_decoder(get("jax").encoders("demo"), None, "cpu", Tiling())
    np.testing.assert_array_equal(decode(LATENTS[:, :, :1]), decoded["tiled_uint8"])


def test_plan_decode_compiles_a_round_of_tiles_and_the_whole_frame_on_one_device():
    """tools/plan.py --kinds decode: one tile per device on all 8; the whole frame (which fits one tile here) on one."""
    from pathlib import Path

    from contentv_common.config.recipe import load_recipe, parse_override
    from contentv_jax.memory_plan import plan_decode
    from contentv_jax.sharding import make_mesh

    def plan(data: int, width: int) -> list:
        overrides = [f"mesh.data={data}", f"data.buckets=[{{width: {width}, height: 64, frames: 9, batch_size: 8}}]"]
        tiny = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
        recipe = load_recipe(tiny, dict(map(parse_override, overrides)))
        return plan_decode(recipe, make_mesh(recipe.mesh, jax.devices()[:data]), 2**30, recipe.data.buckets[0], {})

    (tiles,) = plan(8, 320)  # 8 x 40 latents: tiles of 8 x 32, one per device
    (whole,) = plan(1, 256)  # 8 x 32 latents: one tile, so the whole frame
    assert (tiles.kind, tiles.batch, tiles.tokens) == ("decode-tiles", 8, 8 * 32)
    assert (whole.kind, whole.batch, whole.tokens) == ("decode", 1, 8 * 32)
    assert tiles.fits and whole.fits and tiles.temp_bytes > 0
    # per device, a round of tiles costs what one tile of the same size costs on one device
    assert tiles.temp_bytes == pytest.approx(whole.temp_bytes, rel=0.2)
