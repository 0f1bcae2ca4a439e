"""Text encoders vs diffusers' StableDiffusion3Pipeline.encode_prompt, with tiny random CLIP-L/CLIP-G/T5 on disk."""

import numpy as np
import pytest
import torch

from contentv_torch_npu.text_encoders import load_text_encoders, tiny_text_encoders

PROMPTS = [
    "a cat walking on the sea",
    "The RED dog!! under a blue sky, 漢字 and unknown words",
    " ".join(["a red cat"] * 40),  # longer than 77 CLIP tokens: truncated
]
NEGATIVES = ["low quality", "", "blue"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_text_encoders(seed=3, max_sequence_length=32).save(tmp_path_factory.mktemp("pipe"))


def _diffusers_pipeline(folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    return StableDiffusion3Pipeline(
        transformer=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
        text_encoder_3=T5EncoderModel.from_pretrained(folder / "text_encoder_3"),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=AutoTokenizer.from_pretrained(folder / "tokenizer_2"),
        tokenizer_3=AutoTokenizer.from_pretrained(folder / "tokenizer_3"),
    )


def test_encode_matches_diffusers_encode_prompt(folder, rel_err):
    ours = load_text_encoders(folder, max_sequence_length=32)
    assert (ours.text_dim, ours.pooled_dim, ours.sequence_length) == (48, 24, 77 + 32)
    pipe = _diffusers_pipeline(folder)
    with torch.no_grad():
        ref = pipe.encode_prompt(
            PROMPTS,
            None,
            None,
            device=torch.device("cpu"),
            do_classifier_free_guidance=True,
            negative_prompt=NEGATIVES,
            max_sequence_length=32,
        )
    embeds, pooled = ours.encode(PROMPTS)
    neg_embeds, neg_pooled = ours.encode(NEGATIVES)
    assert embeds.shape == (3, 109, 48) and pooled.shape == (3, 24)
    for got, want in zip((embeds, neg_embeds, pooled, neg_pooled), ref, strict=True):
        assert got.shape == tuple(want.shape)
        assert rel_err(got, want.numpy()) < 1e-6
    # CLIP features fill 16 + 24 of 48 columns (the rest is SD3's zero padding); T5 fills all of its tokens
    assert np.all(embeds[:, :77, 40:] == 0)
    assert np.abs(embeds[:, :77, :40]).mean() > 1e-2 and np.abs(embeds[:, 77:]).mean() > 1e-2
    assert rel_err(embeds[0], embeds[1]) > 0.1, "different prompts must give different embeddings"


def test_missing_subfolder_is_named(tmp_path):
    for name in ("text_encoder", "tokenizer"):
        (tmp_path / name).mkdir()
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        load_text_encoders(tmp_path)
