"""CLIP preference scorer (PickScore / HPS style) in PyTorch, the twin of contentv_jax/reward/clip.py.

score = exp(logit_scale) * cos(visual_projection(vision(frames)), text_projection(text(ids))). `state_dict()` keys
are the canonical names of contentv_common.reward.clip_table.CLIP_TABLE. Frames enter as `[B, H, W, 3]` floats in
[0, 1] (channels last, as every reward); preprocessing is the shared fixed linear maps, so gradients reach the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from contentv_common.checkpoint.formats import check_keys
from contentv_common.reward.clip_preprocess import clip_resize_crop_matrices, normalisation
from contentv_common.reward.clip_table import (
    CLIP_TABLE,
    ClipConfig,
    ClipTowerConfig,
    load_clip_tokenizer,
    open_clip_source,
    tokenize,
)
from contentv_common.reward.models import RewardBase
from contentv_torch_npu.loading import numpy_to_torch


def _activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x)


class Attention(nn.Module):
    def __init__(self, cfg: ClipTowerConfig, causal: bool):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.causal = cfg.num_attention_heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            rearrange(p(x), "b n (h d) -> b h n d", h=self.heads) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, cfg: ClipTowerConfig):
        super().__init__()
        self.act = cfg.hidden_act
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_activation(self.act, self.fc1(x)))


class Layer(nn.Module):
    """Pre-norm transformer layer (CLIPEncoderLayer)."""

    def __init__(self, cfg: ClipTowerConfig, causal: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg, causal)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextTower(nn.Module):
    """Causal text transformer; the pooled state is the first end-of-text token (right padding is harmless)."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        t = cfg.text
        self.eos_token_id = cfg.eos_token_id
        self.token_embedding = nn.Embedding(cfg.vocab_size, t.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, t.hidden_size)
        self.layers = nn.ModuleList([Layer(t, True) for _ in range(t.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(t.hidden_size, eps=t.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.position_embedding.weight[:length][None]
        for layer in self.layers:
            x = layer(x)
        x = self.final_norm(x)
        if self.eos_token_id == 2:  # legacy configs: end-of-text is the largest id (transformers' rule)
            pos = input_ids.argmax(-1)
        else:
            pos = (input_ids == self.eos_token_id).int().argmax(-1)
        return x[torch.arange(x.shape[0], device=x.device), pos]


class VisionTower(nn.Module):
    """ViT: bias-free patch conv, class token, pre/post norms."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        v, p = cfg.vision, cfg.patch_size
        self.patch_size = p
        self.class_embedding = nn.Parameter(torch.randn(v.hidden_size) * v.hidden_size**-0.5)
        self.patch_embedding = nn.Parameter(torch.randn(v.hidden_size, 3, p, p) * 0.02)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, v.hidden_size)
        self.pre_norm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.layers = nn.ModuleList([Layer(v, False) for _ in range(v.num_hidden_layers)])
        self.post_norm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, S, S, 3] (normalised, channels last) -> pooled class state [B, D]."""
        x = F.conv2d(pixel_values.permute(0, 3, 1, 2), self.patch_embedding, stride=self.patch_size)
        x = rearrange(x, "b d h w -> b (h w) d")
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.weight[None]
        x = self.pre_norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.post_norm(x[:, 0])


class ClipScorer(nn.Module):
    """CLIP vision + text towers, projections and logit scale; `forward(frames, input_ids) -> scores [B]`."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.text = TextTower(cfg)
        self.vision = VisionTower(cfg)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, H, W, 3] in [0, 1] -> CLIP pixel values [B, S, S, 3] (resize, centre crop, normalise)."""
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"CLIP scorer frames must be [B, H, W, 3], got shape {tuple(frames.shape)}")
        r_h, r_w = clip_resize_crop_matrices(frames.shape[1], frames.shape[2], self.cfg.image_size)
        scale, offset = normalisation(self.cfg.image_mean, self.cfg.image_std)
        dev = frames.device
        x = torch.einsum(
            "ih,bhwc,jw->bijc", torch.from_numpy(r_h).to(dev), frames.float(), torch.from_numpy(r_w).to(dev)
        )
        return x * torch.from_numpy(scale).to(dev) + torch.from_numpy(offset).to(dev)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) image embeddings, as CLIPModel.get_image_features."""
        return self.visual_projection(self.vision(pixel_values))

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) text embeddings, as CLIPModel.get_text_features."""
        return self.text_projection(self.text(input_ids))

    def forward(self, frames: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.image_features(self.preprocess(frames)).float(), dim=-1, eps=0.0)
        text = F.normalize(self.text_features(input_ids).float(), dim=-1, eps=0.0)
        return self.logit_scale.exp() * (image * text).sum(-1)


def load_clip_scorer(folder: str | Path, device: str | torch.device = "cpu") -> ClipScorer:
    """A ClipScorer from a local transformers CLIPModel folder; every key and shape is checked first."""
    source = open_clip_source(folder)
    with torch.device("meta"):
        model = ClipScorer(source.config)
    check_keys(source, {k: tuple(v.shape) for k, v in model.state_dict().items()}, CLIP_TABLE)
    state = {name: numpy_to_torch(array).float() for name, array in source.tensors()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device)


class ClipReward(RewardBase):
    """The scorer as a `Reward`: prompts -> ids with the scorer's tokenizer, `score_tokens` is differentiable."""

    def __init__(self, scorer: ClipScorer, tokenizer):
        self.scorer, self.tokenizer = scorer, tokenizer

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return tokenize(self.tokenizer, prompts, self.scorer.cfg.max_position_embeddings)

    def score_tokens(self, frames: torch.Tensor, tokens: np.ndarray | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens, device=frames.device)
        return self.scorer(frames, ids.long())


def load_clip_reward(folder: str | Path, device: str | torch.device = "cpu") -> ClipReward:
    """Scorer weights and tokenizer from one CLIPModel folder (e.g. a local PickScore download)."""
    scorer = load_clip_scorer(folder, device).requires_grad_(False)
    return ClipReward(scorer, load_clip_tokenizer(folder))


class ClipEmbeddings:
    """The scorer's unit image and text embeddings, numpy in and out (contentv_common.eval.clip's protocol)."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        self.scorer = load_clip_scorer(folder, device).requires_grad_(False)
        self.tokenizer, self.device = load_clip_tokenizer(folder), device

    @torch.no_grad()
    def image_embeddings(self, frames: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(frames)).to(self.device).float() / 255.0
        emb = self.scorer.image_features(self.scorer.preprocess(x)).float()
        return F.normalize(emb, dim=-1, eps=0.0).cpu().numpy()

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        ids = tokenize(self.tokenizer, list(prompts), self.scorer.cfg.max_position_embeddings)
        emb = self.scorer.text_features(torch.from_numpy(ids).to(self.device).long()).float()
        return F.normalize(emb, dim=-1, eps=0.0).cpu().numpy()
