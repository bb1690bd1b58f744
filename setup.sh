#!/usr/bin/env bash
# Sets up dream3d in ./.venv on a fresh machine. `./setup.sh --test` adds what the tests need.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
# torch first and pinned: on our machines this is a local CPU build; any other spec pulls a multi-GB CUDA build.
.venv/bin/pip install --quiet torch==2.13.0
# gsplat builds CUDA kernels only for a CUDA build of torch; otherwise it installs its Python side
if [[ "$(.venv/bin/python -c 'import torch; print(torch.version.cuda)')" == "None" ]]; then
    export BUILD_NO_CUDA=1
fi
if [[ "${1:-}" == "--test" ]]; then
    .venv/bin/pip install --quiet -e ".[test]"
    # the Khronos glTF validator, which the export tests run on every GLB we write
    npm install --silent --no-audit --no-fund --prefix .cache/node gltf-validator@2.0.0-dev.3.10 >/dev/null
else
    .venv/bin/pip install --quiet -e .
fi
