"""Makes an asset for each prompt of a text file with dream3d's Python API, one after another.

    python examples/batch_generate.py prompts.txt --steps 300 --out runs/examples

Every bad input (an unknown word, a bad setting) is a ValueError with a one-line message,
so one bad prompt is reported and skipped. For many prompts on several GPUs or machines,
with a manifest that survives restarts, use `dream3d batch prompts.txt` instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import dream3d
from dream3d.run.loop import Progress


def show_progress(prompt: str):
    def on_event(event: Progress) -> None:
        if event.kind in ("preview", "done"):
            print(f"  {prompt}: {event.kind} at step {event.step}/{event.total}", flush=True)

    return on_event


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", type=Path, help="one prompt a line; # starts a comment")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default="runs")
    args = parser.parse_args()
    lines = [line.strip() for line in args.prompts.read_text().splitlines()]
    made, failed = {}, {}
    for prompt in (line for line in lines if line and not line.startswith("#")):
        try:
            result = dream3d.generate(prompt, steps=args.steps, out=args.out, on_event=show_progress(prompt))
        except ValueError as e:
            failed[prompt] = str(e)
            continue
        made[prompt] = result.files["glb"]
    for prompt, glb in made.items():
        print(f"{prompt}: {glb}")
    for prompt, error in failed.items():
        print(f"{prompt}: failed: {error}")


if __name__ == "__main__":
    main()
