"""Peak RSS of loading 2 of the 8 MoE layers of a sharded BF16 checkpoint and running one
step: the rise over the same run on a checkpoint whose experts have ffn 1 must be at most
1.25 x those 2 layers' bytes + 64 MiB. The other 6 layers (three times as many bytes) must
not be read: their shards hold garbage where the tensors' bytes are, and one of them is
truncated, so opening it fails.

usage: sharded_peak_rss.py TOOL WORK_DIR"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np

LAYERS, E, H, TOKENS = 8, 8, 1024, 64
LOADED = (2, 5)  # in shards 2 and 3 of 4 (two layers a shard)


def write_shard(path, tensors):
    header, offset = {}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for array in tensors.values():
            f.write(array.tobytes())


def make_checkpoint(folder, ffn):
    os.makedirs(folder)
    rng = np.random.default_rng(1)
    weight_map = {}
    for shard in range(LAYERS // 2):
        name = f"model-{shard + 1:05d}-of-{LAYERS // 2:05d}.safetensors"
        tensors = {}
        for layer in (2 * shard, 2 * shard + 1):
            p = f"model.layers.{layer}.mlp."
            bf16 = lambda shape: (rng.standard_normal(shape).astype(np.float32) * 0.03).view(
                np.uint32).__rshift__(16).astype(np.uint16)
            tensors[p + "gate.weight"] = bf16((E, H))
            for e in range(E):
                for proj, shape in (("gate_proj", (ffn, H)), ("up_proj", (ffn, H)),
                                    ("down_proj", (H, ffn))):
                    if layer in LOADED:
                        tensors[p + f"experts.{e}.{proj}.weight"] = bf16(shape)
                    else:  # never read: garbage bytes (all-ones BF16 is NaN)
                        tensors[p + f"experts.{e}.{proj}.weight"] = np.full(shape, 0xFFFF,
                                                                            np.uint16)
        write_shard(os.path.join(folder, name), tensors)
        weight_map.update({t: name for t in tensors})
    last = os.path.join(folder, f"model-{LAYERS // 2:05d}-of-{LAYERS // 2:05d}.safetensors")
    os.truncate(last, os.path.getsize(last) // 2)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    np.save(os.path.join(folder, "x.npy"),
            rng.standard_normal((TOKENS, H)).astype(np.float32))
    loaded_bytes = 0
    for layer in LOADED:
        loaded_bytes += E * 3 * ffn * H * 2 + E * H * 2
    return loaded_bytes


def peak_kib(tool, folder):
    config = os.path.join(folder, "model.toml")
    with open(config, "w") as f:
        f.write(f"""[runtime]
ranks = 2
[router]
top_k = 2
[model]
weights = "{folder}"
format = "deepseek"
prefix = "model.layers.{{layer}}.mlp."
layers = "{','.join(map(str, LOADED))}"
[input]
tokens = "{os.path.join(folder, 'x.npy')}"
""")
    done = subprocess.run(["/usr/bin/time", "-v", tool, "run", config], capture_output=True,
                          text=True, timeout=240)
    if done.returncode != 0:
        sys.exit("FAIL: switchyard run failed:\n" + done.stdout + done.stderr)
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))


def main():
    tool, work = sys.argv[1], sys.argv[2]
    shutil.rmtree(work, ignore_errors=True)
    small_bytes = make_checkpoint(os.path.join(work, "ffn1"), 1)
    large_bytes = make_checkpoint(os.path.join(work, "ffn1536"), 1536)
    small, large = peak_kib(tool, os.path.join(work, "ffn1")), peak_kib(
        tool, os.path.join(work, "ffn1536"))
    extra_kib = (large_bytes - small_bytes) // 1024
    all_kib = extra_kib * LAYERS // len(LOADED)
    limit_kib = extra_kib * 5 // 4 + 64 * 1024
    rise_kib = large - small
    print(f"2 of 8 layers: +{extra_kib} KiB of weights (all 8: {all_kib} KiB); peak RSS "
          f"{small} -> {large} KiB (+{rise_kib} KiB); limit 1.25 x + 64 MiB = {limit_kib} KiB")
    if rise_kib > limit_kib:
        sys.exit("FAIL: peak RSS rose more than the limit")


if __name__ == "__main__":
    main()
