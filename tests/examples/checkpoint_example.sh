#!/usr/bin/env bash
# Runs examples/checkpoint end to end: NumPy writes a checkpoint and computes the layer's
# output on its own; `switchyard run` must agree with it (and with its own --check).
set -euo pipefail
tool=$1 source=$2 work=$3
rm -rf "$work"
for format in deepseek mixtral; do
  /usr/bin/python3 "$source/examples/checkpoint/make_checkpoint.py" "$work/$format" --format "$format"
  "$tool" run "$source/examples/checkpoint/$format.toml" --check \
    --set "model.weights=$work/$format/layer.safetensors" \
    --set "input.tokens=$work/$format/x.npy" --set "output.path=$work/$format/y.npy"
  /usr/bin/python3 "$source/examples/checkpoint/compare.py" "$work/$format/y.npy" \
    "$work/$format/expected.npy" 1e-5
done
