"""Architecture-true models with random weights: ``--model random:NAME``, no download.

``random:sd-2.1-base``, ``random:if-i-xl`` and ``random:mvdream-sd2.1`` build the published model's
components at their real sizes from its config.json values (kept as data in ``random_configs/NAME.json``) with seeded random
weights, so time and memory can be measured at real size on any machine. What they compute is
noise: they are for cost measurements and plumbing tests, never for results.

The tokenizer is not the model's (its vocabulary would be a download): ``ByteTokenizer`` spells a
prompt as its UTF-8 bytes, with the model's special ids, padding and length, so the text encoder
sees inputs of the real shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from dream3d.guidance.priors.base import PriorError

PREFIX = "random:"
CONFIGS = Path(__file__).with_name("random_configs")
# each component's seed, so that building one component does not shift another's weights
SEEDS = {"unet": 0, "vae": 1, "text_encoder": 2}


def available() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def random_spec(model: str) -> dict[str, Any] | None:
    """The spec (model_index, scheduler, text_encoder, tokenizer, unet[, vae] configs) of a ``random:NAME``
    model, None for any other model name; PriorError for an unknown NAME."""
    if not model.startswith(PREFIX):
        return None
    name = model[len(PREFIX):]
    if name not in available():
        raise PriorError(f"no random model {name!r}; available: {', '.join(PREFIX + n for n in available())}")
    return json.loads((CONFIGS / f"{name}.json").read_text())


def build_component(spec: dict[str, Any], component: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A float32 ``component`` of ``spec`` with seeded random weights, initialised on ``device`` (a GPU
    initialises a billion weights in a moment, a CPU in a minute; the weights differ by device type).
    The global RNG is left as it was."""
    import diffusers
    import transformers

    library, class_name = spec["model_index"][component]
    config = {k: v for k, v in spec[component].items() if k != "model_type"}
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(SEEDS[component])
        if library == "diffusers":
            return getattr(diffusers, class_name).from_config(config)
        if library == "dream3d":  # MVDream's UNet is our own module (mvdream_unet.py)
            from dream3d.guidance.priors.mvdream_unet import MultiViewUNet, MVDreamUNetConfig

            return MultiViewUNet(MVDreamUNetConfig(**config))
        model_class = getattr(transformers, class_name)
        return model_class(model_class.config_class(**config))


class ByteTokenizer:
    """A prompt as UTF-8 byte ids (byte b -> b + 3, clear of the special ids), between the model's BOS
    (if it has one) and EOS, truncated and padded to max_length: the shape of the real tokenizer's output."""

    OFFSET = 3

    def __init__(self, model_max_length: int, vocab_size: int, bos_token_id: int | None, eos_token_id: int,
                 pad_token_id: int) -> None:
        self.model_max_length = model_max_length
        self.vocab_size = vocab_size
        self.bos, self.eos, self.pad = bos_token_id, eos_token_id, pad_token_id

    def encode(self, text: str, max_length: int) -> list[int]:
        head = [] if self.bos is None else [self.bos]
        body = [b + self.OFFSET for b in text.encode()][: max_length - len(head) - 1]
        return head + body + [self.eos]

    def __call__(self, texts: list[str], padding: str = "max_length", max_length: int | None = None,
                 truncation: bool = True, return_tensors: str = "pt") -> SimpleNamespace:
        """input_ids and attention_mask [N, max_length] long, as a transformers tokenizer returns them."""
        length = max_length or self.model_max_length
        ids = [self.encode(text, length) for text in texts]
        mask = [[1] * len(row) + [0] * (length - len(row)) for row in ids]
        ids = [row + [self.pad] * (length - len(row)) for row in ids]
        return SimpleNamespace(input_ids=torch.tensor(ids, device="cpu"), attention_mask=torch.tensor(mask, device="cpu"))
