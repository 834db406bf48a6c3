#!/usr/bin/env bash
# The main job on a shipped example: install graphsurgeon, build the digits CNN offline, and
# run `graphsurgeon optimize` on it with nothing but the model path (embedded defaults: this
# machine detected as the profile, generated inputs, a 5-minute budget), then check the bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[examples]"
python examples/build.py digits
graphsurgeon optimize examples/models/digits_cnn.onnx -o examples/models/digits.bundle
graphsurgeon verify examples/models/digits.bundle --reference examples/models/digits_cnn.onnx \
  --data examples/models/digits_test.npz
echo "open examples/models/digits.bundle/report.html for the Pareto front, baselines and decisions"
