"""Whole pipelines from local folders: SD3 image mode vs diffusers' StableDiffusion3Pipeline, and a ContentV folder."""

import json

import numpy as np
import pytest
import torch

import contentv_jax
import contentv_jax.sampling as jax_sampling
import contentv_torch_npu
import contentv_torch_npu.sampling as torch_sampling
from contentv_common.checkpoint.formats import write_diffusers
from contentv_common.cli import sample as sample_tool
from contentv_common.config.model import named_model_config
from contentv_common.data.embedding_cache import EmbeddingCache
from contentv_common.data.video_io import read_video
from contentv_common.sampling import draw_noise, latent_shape
from contentv_torch_npu.encoders import SD3ImageVAE, load_encoders, tiny_encoders
from contentv_torch_npu.loading import canonical_tensors
from contentv_torch_npu.reference import build_diffusers
from contentv_torch_npu.text_encoders import tiny_text_encoders
from tests.parity.test_text_encoders import transformers_text_modules

STEPS, GUIDANCE, SHIFT = 4, 4.5, 3.0
PROMPT, NEGATIVE = "a cat walking on the sea", "low quality"


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """A tiny SD3 pipeline folder: CLIP-L/CLIP-G/T5, 2D AutoencoderKL (16 channels, 8x), SD3 transformer."""
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("sd3_pipeline")
    tiny_text_encoders(seed=1).save(folder)
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    ).save_pretrained(folder / "vae")
    build_diffusers(named_model_config("tiny").replace(pos_embed="sd3_2d")).save_pretrained(folder / "transformer")
    return folder


def _diffusers_sd3(folder):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(folder / "transformer"),
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
        **transformers_text_modules(folder),
    )


@pytest.mark.slow
def test_sd3_image_mode_matches_diffusers_pipeline(sd3_folder, rel_err):
    """Same folder, prompt, negative prompt and initial latents: our samplers end where diffusers' pipeline ends."""
    noise = draw_noise(2, latent_shape(16, frames=1, height=32, width=48))
    pipe = _diffusers_sd3(sd3_folder)
    with torch.no_grad():
        ref = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            height=32,
            width=48,
            num_inference_steps=STEPS,
            sigmas=list(np.linspace(1.0, 1 / STEPS, STEPS)),
            guidance_scale=GUIDANCE,
            latents=torch.from_numpy(noise[:, :, 0]),
            output_type="latent",
        ).images.numpy()[:, :, None]
        ref_image = pipe.vae.decode(torch.from_numpy(ref[:, :, 0]) / 1.5305 + 0.0609).sample.clamp(-1, 1)
    encoders = load_encoders(sd3_folder)
    assert isinstance(encoders.vae, SD3ImageVAE)
    text, pooled = encoders.encode_text([PROMPT])
    neg = encoders.encode_text([NEGATIVE])
    args = (noise, text, pooled, *neg, STEPS, GUIDANCE, SHIFT)
    ours_torch = torch_sampling.sample(
        contentv_torch_npu.load_transformer(sd3_folder / "transformer"), *args, progress=False
    )
    ours_jax = jax_sampling.sample(contentv_jax.load_transformer(sd3_folder / "transformer"), *args, progress=False)
    assert rel_err(ours_torch, ref) < 1e-5 and rel_err(ours_jax, ref) < 1e-5
    assert rel_err(ref, noise) > 0.05
    frames = encoders.decode_latents(ours_jax)
    ref_frames = ((ref_image.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round()[:, None]
    assert frames.shape == (1, 1, 32, 48, 3) and np.abs(frames - ref_frames).max() <= 1


def test_contentv_folder_loads_the_same_encoders(tmp_path, rel_err):
    """tiny encoders written in the ContentV pipeline layout (Wan VAE) load back identical, with a text cache."""
    tiny = tiny_encoders(seed=4)
    tiny.save(tmp_path / "pipe")
    cfg = named_model_config("tiny")
    write_diffusers(tmp_path / "pipe" / "transformer", cfg, canonical_tensors(contentv_torch_npu.Transformer(cfg)))
    loaded = load_encoders(tmp_path / "pipe", cache_dir=tmp_path / "cache")
    assert (loaded.latent_channels, loaded.text_dim, loaded.pooled_dim) == (16, 48, 24)
    assert isinstance(loaded.cache, EmbeddingCache)
    text, pooled = loaded.encode_text([PROMPT, NEGATIVE])
    want = tiny.encode_text([PROMPT, NEGATIVE])
    assert rel_err(text, want[0]) < 1e-6 and rel_err(pooled, want[1]) < 1e-6
    assert loaded.cache.get(PROMPT) is not None, "the prompt went into the cache"
    video = np.random.default_rng(0).integers(0, 256, (1, 5, 32, 48, 3), dtype=np.uint8)
    latents = loaded.encode_video(video)
    assert latents.shape == (1, 16, 2, 4, 6) and latents.dtype == np.float32
    assert rel_err(latents, tiny.encode_video(video)) < 1e-6


def test_cli_samples_from_a_pipeline_folder(tmp_path):
    """`--pipeline` (ContentV layout): encoders, transformer and the scheduler's shift all come from the folder."""
    pipe = tiny_encoders(seed=5).save(tmp_path / "pipe")
    cfg = named_model_config("tiny")
    write_diffusers(pipe / "transformer", cfg, canonical_tensors(contentv_torch_npu.Transformer(cfg)))
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 5.0}))
    assert sample_tool.pipeline_scheduler(pipe).shift == 5.0
    assert sample_tool.pipeline_scheduler(None).shift == sample_tool.SHIFT
    argv = ["--pipeline", str(pipe), "--prompt", PROMPT, "--frames", "1", "--size", "32x48", "--steps", "2"]
    paths = sample_tool.main([*argv, "--backend", "torch", "--no-progress", "--out", str(tmp_path / "out")])
    frames, _ = read_video(paths[0])
    assert frames.shape == (1, 32, 48, 3)
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"use_karras_sigmas": True}))
    with pytest.raises(SystemExit) as e:
        sample_tool.main([*argv, "--backend", "torch", "--no-progress", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
