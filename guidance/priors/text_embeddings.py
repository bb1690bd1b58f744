"""A diffusers prior's prompts: the text encoder (loaded on first use), the word-level vocabulary check, and the
embeddings, cached on disk keyed by the model's text encoder and tokenizer files (``cache.py``).

``TextEmbeddings`` is a mixin of ``DiffusersPrior``: it reads the prior's ``model``, ``folder``, ``random``,
``index``, ``tokenizer``, ``prompts``, ``cfg``, ``device``, ``dtype``, ``text_max_length`` and
``text_attention_mask``, and loads the encoder with the prior's ``_load_model``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dream3d.guidance.priors.base import Embeddings, PriorError
from dream3d.guidance.priors.cache import cache_root, load_cached, save_cached
from dream3d.guidance.prompts import clip, view_prompts

# Text encoders dream3d loads, by the class name model_index.json gives (never an arbitrary import).
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")


class TextEmbeddings:
    """Prompt embeddings of a diffusers prior: cond, uncond (the negative prompt) and the view prompts."""

    _text_encoder: torch.nn.Module | None
    _embeddings: dict[str, Embeddings]

    def _load_text_encoder(self) -> torch.nn.Module:
        import transformers

        class_name = str(self.index["text_encoder"][-1])
        if class_name not in TEXT_ENCODERS:
            raise PriorError(f"{self.model}: its text encoder is a {class_name}; dream3d loads {', '.join(TEXT_ENCODERS)}")
        model_class = getattr(transformers, class_name)
        return self._load_model("text_encoder", lambda path, **kw: model_class.from_pretrained(path, dtype=self.dtype, **kw))

    @property
    def text_encoder(self) -> torch.nn.Module:
        """Loaded on first use (a prompt whose embeddings are all cached never loads it)."""
        if self._text_encoder is None:
            self._text_encoder = self._load_text_encoder()
        return self._text_encoder

    # -- prompts -----------------------------------------------------------------
    def embed(self, prompt: str) -> Embeddings:
        """cond [L,D] (the prompt), uncond [L,D] (the negative prompt), views [4,L,D] or None; float32."""
        if prompt not in self._embeddings:
            texts = [prompt, self.prompts.negative_prompt]
            if self.prompts.view_dependent:
                texts += view_prompts(prompt)
            states = self.text_embeddings(texts)
            views = states[2:] if self.prompts.view_dependent else None
            self._embeddings[prompt] = Embeddings(prompt, states[0], states[1], views)
        return self._embeddings[prompt]

    def check_vocabulary(self, texts: list[str]) -> None:
        """PriorError listing the vocabulary when a word-level tokenizer cannot spell a word of ``texts``.

        A word-level tokenizer has no subwords to fall back on, so its unknown token means the
        prompt is outside the model's (small) vocabulary; subword tokenizers are not checked."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or type(backend.model).__name__ != "WordLevel":
            return
        special = set(self.tokenizer.all_special_tokens)
        for text in texts:
            words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]
            unknown = [w for w in dict.fromkeys(words) if w not in backend.get_vocab()]
            if unknown:
                vocab = sorted(backend.get_vocab(), key=backend.get_vocab().get)
                raise PriorError(f"{self.model} does not know {clip(', '.join(map(repr, unknown)))} in prompt {clip(text)!r}; "
                                 f"its vocabulary: {' '.join(w for w in vocab if w not in special)}")

    def text_embeddings(self, texts: list[str]) -> Tensor:
        """[N, L, D] float32 on the prior's device: from the disk cache, or encoded and cached."""
        self.check_vocabulary(texts)
        paths = [self.cache_path(text) for text in texts]
        found: dict[int, Tensor] = {}
        for i, path in enumerate(paths):
            cached = load_cached(path)
            if cached is not None:
                found[i] = cached
        missing = [i for i in range(len(texts)) if i not in found]
        if missing:
            encoded = self.encode_text([texts[i] for i in missing]).float().cpu()
            for i, states in zip(missing, encoded):
                save_cached(states.clone(), paths[i])
                found[i] = states
        return torch.stack([found[i] for i in range(len(texts))]).to(self.device)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        """[N, L, D] last hidden states of the text encoder (in the model's dtype)."""
        encoder = self.text_encoder.to(self.device)
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        mask = {"attention_mask": tokens.attention_mask.to(self.device)} if self.text_attention_mask else {}
        states = encoder(tokens.input_ids.to(self.device), **mask)[0]
        if self.cfg.offload_text_encoder:
            encoder.to("cpu")
        return states

    @property
    def max_length(self) -> int:
        return self.text_max_length or int(self.tokenizer.model_max_length)

    def cache_path(self, text: str) -> Path:
        """The embedding cache file of ``text``: keyed by the model's text encoder and tokenizer files and the text."""
        key = json.dumps({"model": self._model_identity(), "text": text, "max_length": self.max_length,
                          "mask": self.text_attention_mask}, sort_keys=True)
        return cache_root() / "text-embeddings" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def _model_identity(self) -> list[Any]:
        """The folder and the size and mtime of every text encoder and tokenizer file (a re-saved model is a new key);
        a random model's name and text encoder config."""
        if self.random:
            return [self.model, self.random["text_encoder"]]
        files = sorted(p for c in ("text_encoder", "tokenizer") for p in (self.folder / c).iterdir() if p.is_file())
        return [str(self.folder.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
