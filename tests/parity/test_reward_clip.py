"""The CLIP preference scorer in JAX and torch against transformers' CLIPModel on tiny random weights (fp32)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from contentv_common.errors import CheckpointError
from contentv_common.reward.clip_preprocess import resize_matrix
from contentv_common.reward.clip_table import read_clip_config
from tests.tiny_clip import tiny_clip_tokenizer

PROMPTS = ["a red cat", "blue dog", "cat"]


def save_tiny_clip(folder, seed: int = 0) -> None:
    """A random tiny CLIPModel (every weight perturbed, norms included) + tokenizer + preprocessor config."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    cfg = CLIPConfig(
        text_config=dict(
            tower,
            vocab_size=58,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_act="quick_gelu",
        ),
        vision_config=dict(tower, image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    tiny_clip_tokenizer().save_pretrained(folder)
    pre = {"image_mean": [0.45, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clip")
    save_tiny_clip(folder)
    return folder


@pytest.fixture(scope="module")
def hf_model(clip_folder):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(clip_folder, attn_implementation="eager").eval()


def test_resize_matrix_matches_pil_bicubic():
    rng = np.random.default_rng(0)
    for h, w, out_h, out_w in [(40, 56, 24, 33), (16, 16, 32, 32), (64, 48, 20, 15)]:
        x = rng.random((h, w)).astype(np.float32)
        ref = np.asarray(Image.fromarray(x, mode="F").resize((out_w, out_h), Image.BICUBIC))
        ours = resize_matrix(h, out_h) @ x.astype(np.float64) @ resize_matrix(w, out_w).T
        assert np.abs(ours - ref).max() < 1e-6


def test_clip_config_reads_folder(clip_folder):
    cfg = read_clip_config(clip_folder)
    assert (cfg.image_size, cfg.patch_size, cfg.eos_token_id, cfg.projection_dim) == (32, 8, 1, 16)
    assert cfg.text.hidden_act == "quick_gelu" and cfg.vision.hidden_act == "gelu"
    assert cfg.image_mean == (0.45, 0.46, 0.41)


def test_torch_scorer_matches_transformers(clip_folder, hf_model, rel_err):
    from contentv_torch_npu.reward.clip import load_clip_reward

    reward = load_clip_reward(clip_folder)
    ids = torch.from_numpy(reward.tokenize(PROMPTS)).long()
    frames = torch.rand(3, 40, 56, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pixels = reward.scorer.preprocess(frames)
        ours_img = reward.scorer.image_features(pixels)
        ours_txt = reward.scorer.text_features(ids)
        ours_score = reward(frames, PROMPTS)
        ref_img = hf_model.get_image_features(pixel_values=pixels.permute(0, 3, 1, 2)).pooler_output
        mask = reward.tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt")["attention_mask"]
        ref_txt = hf_model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        ref_score = hf_model(input_ids=ids, pixel_values=pixels.permute(0, 3, 1, 2)).logits_per_image.diagonal()
    assert rel_err(ours_img.numpy(), ref_img.numpy()) < 1e-5
    assert rel_err(ours_txt.numpy(), ref_txt.numpy()) < 1e-5
    assert rel_err(ours_score.numpy(), ref_score.numpy()) < 1e-5
    assert float(ref_score.std()) > 1e-3  # the prompts/images give different scores: the test can fail


def test_jax_scorer_matches_transformers_and_torch(clip_folder, hf_model, rel_err):
    from contentv_jax.reward.clip import load_clip_reward as load_jax
    from contentv_torch_npu.reward.clip import load_clip_reward as load_torch

    jax_reward, torch_reward = load_jax(clip_folder), load_torch(clip_folder)
    ids = jax_reward.tokenize(PROMPTS)
    np.testing.assert_array_equal(ids, torch_reward.tokenize(PROMPTS))
    frames = np.random.default_rng(2).random((3, 40, 56, 3)).astype(np.float32)
    weights = jnp.arange(1.0, 4.0)
    graphdef, state = nnx.split(jax_reward.scorer)

    @jax.jit  # one compilation instead of many eager op dispatches
    def run(state, frames, ids):
        scorer = nnx.merge(graphdef, state)
        pixels = scorer.preprocess(frames)
        grad = jax.grad(lambda f: jnp.sum(scorer(f, ids) * weights))(frames)
        return pixels, scorer.image_features(pixels), scorer.text_features(ids), scorer(frames, ids), grad

    pixels, img, txt, score, g_jax = run(state, jnp.asarray(frames), jnp.asarray(ids))
    with torch.no_grad():
        t_pixels = torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2)
        t_ids = torch.from_numpy(ids).long()
        ref_img = hf_model.get_image_features(pixel_values=t_pixels).pooler_output.numpy()
        ref_txt = hf_model.get_text_features(input_ids=t_ids).pooler_output.numpy()
        ref_score = hf_model(input_ids=t_ids, pixel_values=t_pixels).logits_per_image.diagonal().numpy()
    assert rel_err(img, ref_img) < 1e-5
    assert rel_err(txt, ref_txt) < 1e-5
    assert rel_err(score, ref_score) < 1e-5

    # reward gradients w.r.t. the pixels agree between the backends (the path reward backprop uses)
    t_frames = torch.from_numpy(frames).requires_grad_(True)
    (torch_reward.score_tokens(t_frames, ids) * torch.arange(1.0, 4.0)).sum().backward()
    assert rel_err(g_jax, t_frames.grad.numpy()) < 1e-5
    assert float(jnp.abs(g_jax).max()) > 0


def test_unknown_key_is_an_error(clip_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    from contentv_torch_npu.reward.clip import load_clip_scorer

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (bad / name).write_text((clip_folder / name).read_text())
    tensors = load_file(clip_folder / "model.safetensors")
    tensors["vision_model.extra.weight"] = np.zeros(2, np.float32)
    del tensors["visual_projection.weight"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="vision_model.extra.weight"):
        load_clip_scorer(bad)
    del tensors["vision_model.extra.weight"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing key 'visual_projection.weight'"):
        load_clip_scorer(bad)
