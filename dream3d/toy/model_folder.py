"""The folder every toy trainer exports: a diffusers-style pipeline folder with a model card.

Each trainer differs only in its UNet (how it is saved and what ``model_index.json`` says of it) and
in the card's title and description; the rest (text encoder, tokenizer, scheduler, index entries,
card layout, the atomic rename into place) is written here once.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from pydantic import BaseModel


class ToyPipelineTrainer(Protocol):
    """What ``export_pipeline`` reads from a trainer."""

    tokenizer: Any
    scheduler: Any

    def ema_models(self) -> tuple[torch.nn.Module, torch.nn.Module]: ...


def model_card(title: str, description: str, command: str, seed: int, steps: int, config: BaseModel) -> str:
    """A README.md: ``# title``, the description, the command that made the model, and its training config."""
    return (
        f"# {title}\n\n{description}\n\n"
        f"Made with:\n\n    {command}\n\n"
        f"seed {seed}, {steps} steps. Training configuration:\n\n"
        f"```json\n{json.dumps(config.model_dump(mode='json'), indent=2)}\n```\n"
    )


def write_model_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Builds a model folder with ``write(folder)`` beside ``out``, then renames it into place (no half folder)."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def export_pipeline(trainer: ToyPipelineTrainer, out: Path, save_unet: Callable[[torch.nn.Module, Path], None],
                    index: dict[str, Any], card: str) -> None:
    """Writes the trainer's EMA weights as a model folder at ``out``: ``save_unet(unet, folder / "unet")``, the
    text encoder, tokenizer, scheduler, ``model_index.json`` (``index`` plus the shared entries) and ``card``."""
    import diffusers

    def write(folder: Path) -> None:
        unet, text_encoder = trainer.ema_models()
        save_unet(unet, folder / "unet")
        text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        trainer.tokenizer.save_pretrained(folder / "tokenizer")
        trainer.scheduler.save_pretrained(folder / "scheduler")
        entries = {**index, "_diffusers_version": diffusers.__version__,
                   "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "PreTrainedTokenizerFast"]}
        (folder / "model_index.json").write_text(json.dumps(entries, indent=2) + "\n")
        (folder / "README.md").write_text(card)

    write_model_folder(out, write)
