#!/usr/bin/env bash
# The wheels the device image's python3 (3.12, torch and triton already there, no network) lacks
# for the benches: pack's compressors and the code-size minifier. Run here, then carry .whl
# (git-ignored); bench/gpu_checks.sh installs them from it, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
pip="${PIP:-.venv/bin/pip}"
$pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  -d .whl brotli==1.2.1 zstandard==0.25.0 python-minifier==3.4.0
ls -la .whl
