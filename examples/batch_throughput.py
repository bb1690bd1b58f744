"""Throughput of `dream3d batch` on this machine: the same prompts with 1 and 2 local workers and on Ray.

    python examples/batch_throughput.py --out bench/batch [--steps 60] [--resolution 32] [key=value ...]

Each configuration is one `dream3d batch` command into a fresh output folder, timed from
start to exit (process start-up, Ray's start for `--ray auto`, every job's prior load,
training and export). Prints a markdown table; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dream3d.batch.manifest import Manifest

CONFIGURATIONS = {
    "local, 1 worker": ["--workers", "1"], "local, 2 workers": ["--workers", "2"], "Ray (--ray auto)": ["--ray", "auto"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=Path, default=Path(__file__).parent / "prompts.txt")
    parser.add_argument("--out", type=Path, default=Path("bench/batch"))
    parser.add_argument("--steps", default="60")
    parser.add_argument("--resolution", default="32")
    parser.add_argument("overrides", nargs="*", help="key=value settings for every job")
    args = parser.parse_args()
    print("| executor | assets done | wall s | assets/min | mean job s |\n|---|---|---|---|---|")
    for index, (name, options) in enumerate(CONFIGURATIONS.items()):
        out = args.out / f"run{index}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "dream3d", "batch", str(args.prompts), "--out", str(out),
                   "--steps", args.steps, "--resolution", args.resolution, *args.overrides, *options]
        tick = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - tick
        done = [r for r in Manifest.load(out).records.values() if r.state == "done"]
        mean = sum(r.seconds for r in done) / max(len(done), 1)
        print(f"| {name} | {len(done)} | {wall:.1f} | {60 * len(done) / wall:.2f} | {mean:.1f} |", flush=True)


if __name__ == "__main__":
    main()
