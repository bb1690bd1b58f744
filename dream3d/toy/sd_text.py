"""The text side of toy-sd: its training captions and its CLIP tokenizer.

Captions are what ``--prior sd`` sends for a toy prompt: the prompt, or a partial one ("a cube", "a red
object"), with the view suffix ``guidance/prompts.py`` appends for the render's camera, or "" (the
unconditional branch of classifier-free guidance).

The tokenizer is Stable Diffusion's ``CLIPTokenizer`` (vocab.json + merges.txt) over a vocabulary learned
here. The vocabulary has CLIP's layout: the 256 byte symbols, the same with CLIP's ``</w>`` end-of-word
suffix, one token per learned merge, then ``<|startoftext|>`` and ``<|endoftext|>``. The merges are learned
by the ``tokenizers`` BPE trainer, with CLIP's normalizer and pre-tokenizer, from every text the SD path can
send for a toy prompt (captions, view prompts, the rules' negative prompts) until each of their words is one
token. Any other text still encodes (as bytes), never as an unknown token, as with CLIP.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from dream3d.guidance import csd, ism, nfsd
from dream3d.guidance.priors.toy_world import CLASSES, COLOURS, SHAPES
from dream3d.guidance.prompts import view_prompts

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD = "!"  # Stable Diffusion 2.x's tokenizer pads with "!" (id 0), 1.x's with EOS
MAX_LENGTH = 77  # CLIP's context, which SD's pipeline and dream3d's SD prior pad every prompt to
# CLIP's split of normalised text into words (transformers' CLIPConverter)
CLIP_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
NEGATIVE_PROMPTS: tuple[str, ...] = (nfsd.TEXT_NEGATIVE_PROMPT, ism.TEXT_NEGATIVE_PROMPT, csd.TEXT_NEGATIVE_PROMPT)


class CaptionShares(BaseModel):
    """How training captions are drawn: an unconditional share, a partial-prompt share of the rest, and a
    view-suffix share of the prompts (the rest stay bare, as ``--prior sd`` sends them with view prompts off)."""

    model_config = ConfigDict(extra="forbid")

    unconditional: float = Field(0.1, ge=0, le=1)
    partial: float = Field(0.3, ge=0, le=1)
    view_suffix: float = Field(0.8, ge=0, le=1)


def with_article(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def class_prompts(class_id: int) -> tuple[str, ...]:
    """The prompts that name ``CLASSES[class_id]``: in full first, then the partial ones (shape, colour)."""
    colour, shape = CLASSES[class_id]
    return tuple(with_article(w) for w in (f"{colour} {shape}", shape, f"{colour} object", f"{colour} shape"))


def caption(class_id: int, view: int, generator: torch.Generator, shares: CaptionShares) -> str:
    """The caption of one render of ``CLASSES[class_id]`` seen from view ``view`` (an index into prompts.VIEWS)."""
    u_cond, u_partial, u_form, u_view = torch.rand(4, generator=generator).tolist()
    if u_cond < shares.unconditional:
        return ""
    full, *partial = class_prompts(class_id)
    text = partial[min(int(u_form * len(partial)), len(partial) - 1)] if u_partial < shares.partial else full
    return view_prompts(text)[view] if u_view < shares.view_suffix else text


def corpus() -> list[str]:
    """Every text the SD path sends for a toy prompt, with "the" and the bare words a user may write."""
    prompts = [p for c in range(len(CLASSES)) for p in class_prompts(c)]
    prompts += [f"the {c.name}" for c in CLASSES] + [c.name for c in CLASSES] + ["a shape", "an object"]
    return [t for p in prompts for t in (p, *view_prompts(p))] + [*COLOURS, *SHAPES, *NEGATIVE_PROMPTS]


def learn_merges(texts: list[str]) -> list[tuple[str, str]]:
    """BPE merges learned from ``texts`` with CLIP's normalizer, pre-tokenizer and ``</w>`` suffix, in rank order."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    backend = Tokenizer(BPE(end_of_word_suffix="</w>"))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    # a vocabulary larger than the texts can fill: merging stops when every word is one token
    trainer = BpeTrainer(vocab_size=100_000, min_frequency=1, show_progress=False, end_of_word_suffix="</w>",
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    merges = json.loads(backend.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout over ``merges``: bytes, bytes + ``</w>``, merged tokens, BOS, EOS."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def save_tokenizer(folder: Path) -> None:
    """Writes the toy-sd tokenizer to ``folder``: vocab.json, merges.txt and SD 2.x's tokenizer settings."""
    from transformers import CLIPTokenizer

    merges = learn_merges(corpus())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(merges), ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer.from_pretrained(folder, unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                              model_max_length=MAX_LENGTH)
    tokenizer.save_pretrained(folder)


def build_tokenizer() -> Any:
    """The toy-sd ``CLIPTokenizer`` (built in a temporary folder, held in memory)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)
