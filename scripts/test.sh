#!/usr/bin/env bash
# Install what the tests need and run them. torch is pinned first: a looser requirement with
# no torch installed would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m ruff check graphsurgeon passes kernels tests benchmarks examples
python -m ruff format --check graphsurgeon passes kernels tests benchmarks examples
python -m pytest -q "$@"
