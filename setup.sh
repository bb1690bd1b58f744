#!/usr/bin/env bash
# Sets up dream3d in ./.venv on a fresh machine. `./setup.sh --test` adds what the tests need.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
# torch first and pinned. From PyPI on Linux, torch 2.13.0 is a CUDA build (several GB, its CUDA runtime included);
# a machine whose package index serves a CPU build (as our CPU-only ones do) gets that instead.
.venv/bin/pip install --quiet torch==2.13.0
# gsplat and nerfacc install as Python only and compile their CUDA kernels on the first GPU run, which needs ninja,
# a C++ compiler and an nvcc (CUDA toolkit) of torch's CUDA major version; without them the Gaussians fall back
# to a slower PyTorch rasterizer and the NeRF to its dense sampler. `dream3d doctor` says which you have.
if [[ "$(.venv/bin/python -c 'import torch; print(torch.version.cuda)')" == "None" ]]; then
    export BUILD_NO_CUDA=1
else
    .venv/bin/pip install --quiet ninja
fi
if [[ "${1:-}" == "--test" ]]; then
    .venv/bin/pip install --quiet -e ".[test]"
    # the Khronos glTF validator, which the export tests run on every GLB we write
    npm install --silent --no-audit --no-fund --prefix .cache/node gltf-validator@2.0.0-dev.3.10 >/dev/null
else
    .venv/bin/pip install --quiet -e .
fi
echo "dream3d is installed in .venv; on a GPU machine, .venv/bin/dream3d doctor shows what will run where."
