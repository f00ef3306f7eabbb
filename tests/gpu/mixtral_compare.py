#!/usr/bin/env python3
"""The whole Switchyard layer at world 1 against Hugging Face's MixtralSparseMoeBlock on
the same BF16 weights and tokens, at T = 8192 for (E=8, k=2, H=4096, F=14336) and
(E=64, k=8, H=2048, F=1408): the median time of a forward of each (CUDA events), and how
far the outputs are apart (per-row relative error; a few rows may route differently
because PyTorch rounds the router logits to BF16, so the 99th percentile is reported and
checked, and the median must be at BF16 rounding).

usage: mixtral_compare.py BENCH_GPU WORKDIR   (run by tests/gpu/run.sh; prints table rows)
"""
import os
import re
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

SHAPES = [(8, 2, 4096, 14336), (64, 8, 2048, 1408)]
TOKENS = 8192


def expert_tensors(block, num_experts, hidden):
    """Mixtral-format tensors of the block's experts: experts.{e}.w1/w3/w2.weight."""
    tensors = {}
    experts = block.experts
    if hasattr(experts, "gate_up_proj"):  # fused experts (newer transformers)
        gate_up = experts.gate_up_proj.detach()
        down = experts.down_proj.detach()
        half = gate_up.shape[1] // 2
        for e in range(num_experts):
            # Stored [E, 2F, H] or [E, H, 2F] depending on the version: make it [2F, H].
            gu = gate_up[e] if gate_up.shape[1] != hidden else gate_up[e].t()
            dn = down[e] if down.shape[1] == hidden else down[e].t()
            tensors[f"experts.{e}.w1.weight"] = gu[:half].contiguous()
            tensors[f"experts.{e}.w3.weight"] = gu[half:].contiguous()
            tensors[f"experts.{e}.w2.weight"] = dn.contiguous()
    else:
        for e in range(num_experts):
            tensors[f"experts.{e}.w1.weight"] = experts[e].w1.weight.detach().contiguous()
            tensors[f"experts.{e}.w3.weight"] = experts[e].w3.weight.detach().contiguous()
            tensors[f"experts.{e}.w2.weight"] = experts[e].w2.weight.detach().contiguous()
    return tensors


def time_ms(fn, iters=10):
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def main():
    bench, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    ok = True
    for E, k, H, F in SHAPES:
        torch.manual_seed(0)
        config = MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E,
                               num_experts_per_tok=k)
        block = MixtralSparseMoeBlock(config).to("cuda", torch.bfloat16).eval()
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.02)
        x = torch.randn(1, TOKENS, H, device="cuda").to(torch.bfloat16)
        with torch.no_grad():
            out = block(x)
            y_ref = (out[0] if isinstance(out, tuple) else out).float()[0].cpu().numpy()
            torch_ms = time_ms(lambda: block(x))
        tensors = {"gate.weight": block.gate.weight.detach().contiguous()}
        tensors.update(expert_tensors(block, E, H))
        checkpoint = os.path.join(work, f"mixtral_{E}.safetensors")
        save_file({n: t.cpu() for n, t in tensors.items()}, checkpoint)
        tokens = os.path.join(work, f"tokens_{E}.npy")
        np.save(tokens, x.float()[0].cpu().numpy())
        output = os.path.join(work, f"y_{E}.npy")
        del block, x
        torch.cuda.empty_cache()
        run = subprocess.run([bench, "layer", checkpoint, tokens, str(k), output, "10"],
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(f"| E={E} k={k} H={H} F={F} | switchyard failed: {run.stderr.strip()} | | | |")
            ok = False
            continue
        layer_ms = float(re.search(r"layer_ms=([0-9.]+)", run.stdout).group(1))
        y = np.load(output)
        row_error = np.linalg.norm(y - y_ref, axis=1) / np.maximum(np.linalg.norm(y_ref, axis=1), 1e-30)
        median, p99 = float(np.median(row_error)), float(np.percentile(row_error, 99))
        agree = median <= 2e-2 and p99 <= 0.1
        faster = layer_ms < torch_ms
        ok = ok and agree and faster
        print(f"| E={E} k={k} H={H} F={F} | {layer_ms:.2f} ms | {torch_ms:.2f} ms "
              f"| {torch_ms / layer_ms:.2f}x {'(faster)' if faster else '(SLOWER)'} "
              f"| row error median {median:.2e}, p99 {p99:.2e} {'ok' if agree else 'DISAGREE'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
