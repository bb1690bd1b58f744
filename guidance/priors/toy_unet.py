"""The trained toy prior ("toy-unet", "toy-unet-mv"): a small pixel-space diffusers model of the toy world.

The shipped folder (``assets/toy-unet``, made by ``dream3d train-prior``) is an ordinary
pixel-space diffusers model: a 32x32 ``UNet2DConditionModel``, a tiny ``CLIPTextModel``, a
word-level tokenizer over the toy vocabulary, and a DDPM scheduler. Its UNet has a
projection class embedding of the camera (elevation, sin/cos azimuth), declared in
``model_index.json``, so the generic pixel prior loads it: "toy-unet" leaves the camera
out (the zero features it was trained with when the camera was dropped), "toy-unet-mv"
passes it. This module defines the architecture, the tokenizer and the training captions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from dream3d.guidance.priors.pixel import PixelPrior
from dream3d.guidance.priors.base import Embeddings
from dream3d.guidance.priors.toy_world import CLASSES, COLOURS, SHAPES, parse_prompt
from dream3d.guidance.prompts import VIEWS

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "assets" / "toy-unet"
CAMERA_FEATURES = ("elevation_rad", "sin_azimuth", "cos_azimuth")

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
# Every word a caption (or a view-dependent prompt made from one) can hold.
WORDS: tuple[str, ...] = ("a", "an", "the", *COLOURS, *SHAPES, "object", "shape", ",", *VIEWS, "view")


class ToyUNetArch(BaseModel):
    """The sizes of the model ``dream3d train-prior`` builds."""

    model_config = ConfigDict(extra="forbid")

    resolution: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_heads: int = 4
    text_dim: int = 64
    text_layers: int = 2
    max_tokens: int = 12


def build_tokenizer() -> Any:
    """A word-level fast tokenizer over ``WORDS``: lower-cased, split on whitespace and punctuation,
    wrapped in <bos> ... <eos>; any other word becomes <unk> (which the loader rejects)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((PAD, BOS, EOS, UNK, *WORDS))}
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=ToyUNetArch().max_tokens)


def build_models(arch: ToyUNetArch, vocab_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(UNet2DConditionModel, CLIPTextModel), randomly initialised from the global torch RNG."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    depth = len(arch.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=arch.resolution, in_channels=3, out_channels=3,
        # text cross-attention at the coarsest level only: the toy prompt is global, and attention at
        # finer levels tripled the CPU cost of a training step
        down_block_types=("DownBlock2D",) * (depth - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (depth - 1),
        block_out_channels=arch.block_out_channels, layers_per_block=arch.layers_per_block,
        norm_num_groups=arch.norm_num_groups, cross_attention_dim=arch.text_dim,
        attention_head_dim=arch.attention_heads, class_embed_type="projection",
        projection_class_embeddings_input_dim=len(CAMERA_FEATURES))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=arch.text_dim, intermediate_size=2 * arch.text_dim,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.attention_heads,
        max_position_embeddings=arch.max_tokens, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    return unet, text_encoder


def build_scheduler() -> Any:
    """The training schedule: 1000 cosine-schedule steps, v-prediction.

    Epsilon prediction left samples noise after 500 steps: near t = 1000 the cosine schedule has
    alpha ~ 0.03, so x0 = (x_t - sigma eps) / alpha magnifies every error in eps 30-fold; v is
    well conditioned there (it is ~ -x0), and the prior converts it back to epsilon."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         clip_sample=True)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(class_id: int, view: int | None, generator: torch.Generator) -> str:
    """A toy-grammar caption of CLASSES[class_id], partial at random so that the model learns
    p(image | "a red shape"), p(image | "a cube") and p(image | "") (the CFG unconditional).

    view: index into VIEWS appended as ", <view> view" (sometimes), or None for no camera.
    """
    colour, shape = CLASSES[class_id]
    u, v = torch.rand(2, generator=generator).tolist()
    if u < 0.15:
        return ""
    if u < 0.3:
        words = f"{colour} {'shape' if u < 0.225 else 'object'}"
    elif u < 0.45:
        words = shape
    else:
        words = f"{colour} {shape}"
    text = f"{_article(words)} {words}"
    if view is not None and v < 0.3:
        text += f", {VIEWS[view]} view"
    return text


# what view-dependent prompting appends (", front view"); the tokenizer knows them, the toy grammar does not
VIEW_WORDS = {*VIEWS, "view"}


class ToyUNetPrior(PixelPrior):
    """The shipped toy model as a camera-free 2D prior."""

    name = "toy-unet"
    default_model = str(SHIPPED_MODEL)
    use_cameras = False

    def embed(self, prompt: str) -> Embeddings:
        """As every pixel prior (whose word-level tokenizer rejects unknown words), then the toy grammar:
        the tokenizer alone would take "a cube sphere", which names no class of the world."""
        embeddings = super().embed(prompt)
        parse_prompt(" ".join(w for w in prompt.replace(",", " ").split() if w.lower() not in VIEW_WORDS))
        return embeddings


class ToyUNetMVPrior(ToyUNetPrior):
    """The shipped toy model conditioned on each render's camera, a multi-view-style prior."""

    name = "toy-unet-mv"
    default_model = str(SHIPPED_MODEL)
    use_cameras = True
