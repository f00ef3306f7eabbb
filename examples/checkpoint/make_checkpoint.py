#!/usr/bin/python3
"""Writes a small MoE layer checkpoint (.safetensors, BF16 weights unless --dtype says), tokens x.npy, and
the layer's output computed here with NumPy alone (expected.npy), independently of
Switchyard:
  --format deepseek: sigmoid scores, an F32 e_score_correction_bias for selection only,
                     top-k, normalised weights (DeepSeek-V3 style; tensors gate_proj/...);
  --format mixtral:  top-k of the logits, softmax over the k (tensors w1/w3/w2).
Experts are SwiGLU. Needs only numpy (Debian: python3-numpy).

usage: make_checkpoint.py OUT_DIR [--format deepseek|mixtral] [--experts 8] [--hidden 32]
                          [--ffn 48] [--tokens 40] [--top-k 2] [--dtype bf16|f16|f32]
                          [--scale 1.0]
--scale multiplies the kept weights after normalising (DeepSeek's routed_scaling_factor;
Switchyard's [router] scale).
"""
import argparse
import json
import os
import struct

import numpy as np


def to_bf16_bits(a):
    """float32 -> bfloat16 bits, round to nearest even (as Switchyard and PyTorch do)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def from_bf16_bits(b):
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32)


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        dtype, array = tensors[name]
        data = array.tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--format", choices=["deepseek", "mixtral"], default="deepseek")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--ffn", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16",
                        help="dtype the weights are stored in (the gate's bias stays F32)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="factor on the kept weights, after normalising")
    args = parser.parse_args()
    E, H, F, T, k = args.experts, args.hidden, args.ffn, args.tokens, args.top_k
    rng = np.random.default_rng(1234)
    deepseek = args.format == "deepseek"
    prefix = "model.layers.3.mlp." if deepseek else "model.layers.3.block_sparse_moe."
    names = ("gate_proj", "up_proj", "down_proj") if deepseek else ("w1", "w3", "w2")

    stored = {"bf16": "BF16", "f16": "F16", "f32": "F32"}[args.dtype]

    def weight(rows, cols):
        """The stored array, and the values it stands for (what the layer computes with)."""
        values = rng.uniform(-1, 1, (rows, cols)).astype(np.float32) / np.sqrt(cols)
        if args.dtype == "bf16":
            bits = to_bf16_bits(values)
            return bits, from_bf16_bits(bits)
        if args.dtype == "f16":
            half = values.astype(np.float16)
            return half, half.astype(np.float32)
        return values, values

    tensors, gate_up_down = {}, []
    gate_bits, gate = weight(E, H)
    tensors[prefix + "gate.weight"] = (stored, gate_bits)
    bias = rng.uniform(-0.05, 0.05, E).astype(np.float32)
    if deepseek:
        tensors[prefix + "gate.e_score_correction_bias"] = ("F32", bias)
    for e in range(E):
        g_bits, g = weight(F, H)
        u_bits, u = weight(F, H)
        d_bits, d = weight(H, F)
        for name, bits in zip(names, (g_bits, u_bits, d_bits)):
            tensors[prefix + f"experts.{e}.{name}.weight"] = (stored, bits)
        gate_up_down.append((g.astype(np.float64), u.astype(np.float64), d.astype(np.float64)))
    os.makedirs(args.out_dir, exist_ok=True)
    write_safetensors(os.path.join(args.out_dir, "layer.safetensors"), tensors)

    x = rng.uniform(-1, 1, (T, H)).astype(np.float32)
    np.save(os.path.join(args.out_dir, "x.npy"), x)

    logits = x.astype(np.float64) @ gate.astype(np.float64).T
    scores = 1.0 / (1.0 + np.exp(-logits)) if deepseek else logits
    selection = scores + bias if deepseek else scores
    y = np.zeros((T, H))
    for t in range(T):
        chosen = sorted(range(E), key=lambda e: (-selection[t, e], e))[:k]
        w = scores[t, chosen]
        if deepseek:
            w = w / (w.sum() + 1e-20)
        else:
            w = np.exp(w - w.max())
            w = w / w.sum()
        w = w * args.scale
        for weight_t, e in zip(w, chosen):
            g, u, d = gate_up_down[e]
            a = g @ x[t]
            y[t] += weight_t * (d @ (a / (1.0 + np.exp(-a)) * (u @ x[t])))
    np.save(os.path.join(args.out_dir, "expected.npy"), y.astype(np.float32))


if __name__ == "__main__":
    main()
