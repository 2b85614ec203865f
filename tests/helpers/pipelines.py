"""Tiny diffusers pipelines (DiT and Stable Diffusion) built locally around a given VAE, for tests."""

from __future__ import annotations

import json

import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel


def tiny_dit_pipeline(vae) -> DiTPipeline:
    """DiT (2-class-head tiny transformer on 8x8x4 latents) + DDIM around ``vae``."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=32,
    ).eval()  # from_pretrained returns eval-mode modules; a fresh one is in train mode
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())


def tiny_clip_tokenizer(folder):
    """A CLIP BPE tokenizer over a handful of words, written locally (no download)."""
    from transformers import CLIPTokenizer

    words = ["a", "photo", "of", "cat", "dog"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = ["#version: 0.2"]
    for word in words:
        letters = list(word[:-1]) + [word[-1] + "</w>"]
        for piece in letters:
            vocab.setdefault(piece, len(vocab))
        merged = letters[0]
        for piece in letters[1:]:  # left-to-right merges down to the whole word
            merges.append(f"{merged} {piece}")
            merged += piece
            vocab.setdefault(merged, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)


def tiny_sd_pipeline(vae, tmp_path):
    """Stable Diffusion pipeline (tiny CLIP text model + UNet on 8x8x4 latents) around ``vae``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer(tmp_path / "tokenizer_files")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
