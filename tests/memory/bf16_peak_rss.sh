#!/usr/bin/env bash
# Peak RSS of loading a BF16 checkpoint and running one step: the rise over the same run
# with an almost empty checkpoint (same H, tokens and ranks; ffn 1) must be at most
# 1.25 x the extra checkpoint bytes + 64 MiB. Widening to f32 would take 2x.
set -euo pipefail
tool=$1 source=$2 work=$3
rm -rf "$work"
mkdir -p "$work"
experts=16 hidden=1024 ffn=1536
peak_kib() {  # peak_kib DIR: max resident set of one `switchyard run` step, in KiB
  /usr/bin/time -v "$tool" run "$source/examples/checkpoint/deepseek.toml" \
    --set "model.weights=$1/layer.safetensors" --set "input.tokens=$1/x.npy" \
    --set "output.path=$1/y.npy" --set model.num_experts=$experts --set model.hidden=$hidden \
    --set "model.ffn_hidden=$2" 2> "$1/time.txt" > "$1/run.txt"
  awk -F': ' '/Maximum resident set size/ {print $2}' "$1/time.txt"
}
for f in 1 $ffn; do
  /usr/bin/python3 "$source/examples/checkpoint/make_checkpoint.py" "$work/ffn$f" \
    --format deepseek --experts $experts --hidden $hidden --ffn $f --tokens 64 > /dev/null
done
small=$(peak_kib "$work/ffn1" 1)
large=$(peak_kib "$work/ffn$ffn" $ffn)
bytes_small=$(stat -c %s "$work/ffn1/layer.safetensors")
bytes_large=$(stat -c %s "$work/ffn$ffn/layer.safetensors")
extra_kib=$(( (bytes_large - bytes_small) / 1024 ))
limit_kib=$(( extra_kib * 5 / 4 + 64 * 1024 ))
rise_kib=$(( large - small ))
echo "checkpoint +${extra_kib} KiB; peak RSS ${small} -> ${large} KiB (+${rise_kib} KiB);" \
     "limit 1.25 x checkpoint + 64 MiB = ${limit_kib} KiB"
/usr/bin/python3 "$source/examples/checkpoint/compare.py" "$work/ffn$ffn/y.npy" \
  "$work/ffn$ffn/expected.npy" 1e-4
if [ "$rise_kib" -gt "$limit_kib" ]; then
  echo "FAIL: peak RSS rose more than the limit"
  exit 1
fi
