#!/usr/bin/env bash
# Sets up dream3d in ./.venv on a fresh machine. `./setup.sh --test` adds what the tests need.
# Each step prints one line; pip's and npm's own output goes to .cache/setup.log and is shown only if a step fails.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p .cache
LOG=.cache/setup.log
: > "$LOG"

step() {  # step "what it does" command...: runs the command with its output in the log; on failure shows the log
    echo "setup: $1"
    if ! "${@:2}" >>"$LOG" 2>&1; then
        cat "$LOG" >&2
        echo "setup failed at: $1 (the output above is also in $LOG)" >&2
        exit 1
    fi
}

step "creating .venv" python3 -m venv .venv
step "upgrading pip" .venv/bin/pip install --upgrade pip
# torch first and pinned. From PyPI on Linux, torch 2.13.0 is a CUDA build (several GB, its CUDA runtime included);
# a machine whose package index serves a CPU build (as our CPU-only ones do) gets that instead.
step "installing torch 2.13.0" .venv/bin/pip install torch==2.13.0
# gsplat and nerfacc install as Python only and compile their CUDA kernels on the first GPU run, which needs ninja,
# a C++ compiler and an nvcc (CUDA toolkit) of torch's CUDA major version; without them the Gaussians fall back
# to a slower PyTorch rasterizer and the NeRF to its dense sampler. `dream3d doctor` says which you have.
if [[ "$(.venv/bin/python -W ignore -c 'import torch; print(torch.version.cuda)')" == "None" ]]; then
    export BUILD_NO_CUDA=1
else
    step "installing ninja (builds gsplat's and nerfacc's CUDA kernels on first use)" .venv/bin/pip install ninja
fi
if [[ "${1:-}" == "--test" ]]; then
    step "installing dream3d with the test tools" .venv/bin/pip install -e ".[test]"
    # the Khronos glTF validator, which the export tests run on every GLB we write
    step "installing the glTF validator (npm)" npm install --no-audit --no-fund --prefix .cache/node gltf-validator@2.0.0-dev.3.10
    echo "setup: done. Next: .venv/bin/python -m pytest -q"
else
    step "installing dream3d" .venv/bin/pip install -e .
    echo 'setup: done. Next: .venv/bin/dream3d run "a red cube"  (on a GPU machine, .venv/bin/dream3d doctor first)'
fi
