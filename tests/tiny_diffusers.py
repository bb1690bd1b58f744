"""Tiny random-weight diffusers models, built from configs and saved in the pipeline layout.

Stable Diffusion (UNet2DConditionModel + AutoencoderKL + CLIPTextModel with a CLIP BPE
tokenizer written here) and DeepFloyd IF stage I (learned-variance pixel UNet with IF's
text projection + T5EncoderModel with a sentencepiece tokenizer trained here), so that the
real loading code runs without a download.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

WORDS = ("a", "cat", "dog", "corgi", "front", "side", "back", "overhead", "view", "blurry", ",")
TEXT_DIM = 16
UNET = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=16,
            attention_head_dim=4)


def clip_tokenizer(folder: Path):
    """A CLIPTokenizer over a word-level vocabulary (no merges needed: every word is one token)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in WORDS + tuple("abcdefghijklmnopqrstuvwxyz"):
        vocab.setdefault(f"{symbol}</w>", len(vocab))
        vocab.setdefault(symbol, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8, pad_token="<|endoftext|>")


def t5_tokenizer(folder: Path):
    """A T5Tokenizer from a sentencepiece model trained here, laid out like DeepFloyd IF's (spiece.model)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    sentences = [" ".join(WORDS), "a cat, front view", "a corgi, back view", "a dog, side view", "overhead blurry"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=24,
                                   model_type="word", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 77}))
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def build_tiny_sd(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A tiny SD 2.x-like model (16x16 images, 8x8x4 latents) saved as a diffusers folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(folder.parent / f"{folder.name}-vocab")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **UNET)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=16)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_if(folder: Path, seed: int = 0) -> Path:
    """A tiny DeepFloyd-IF-stage-I-like model (8x8 pixels, 6 output channels) saved as a diffusers folder."""
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer(folder.parent / f"{folder.name}-spm")
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=12, d_kv=4, d_ff=24, num_layers=1,
                                           num_heads=2))
    unet = UNet2DConditionModel(
        in_channels=3, out_channels=6, down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        encoder_hid_dim=12, encoder_hid_dim_type="text_proj", addition_embed_type="text", addition_embed_type_num_heads=2,
        resnet_time_scale_shift="scale_shift", **UNET)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", clip_sample=False)
    pipe = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
