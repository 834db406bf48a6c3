#!/usr/bin/env bash
# Install graphsurgeon, build the digits CNN example offline, run the cleanup pipeline on it
# and then an int8 pipeline, each verified numerically against the original model.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[examples]"
python examples/build.py digits
graphsurgeon inspect examples/models/digits_cnn.onnx --shape input=1x1x8x8
graphsurgeon run cleanup examples/models/digits_cnn.onnx -o examples/models/digits_cnn.clean.onnx \
  --verify numeric --calib examples/models/digits_test.npz --report examples/models/digits_cnn.clean.json
graphsurgeon run examples/pipelines/digits_int8.yaml examples/models/digits_cnn.onnx \
  -o examples/models/digits_cnn.int8.onnx --verify numeric --calib examples/models/digits_train.npz
