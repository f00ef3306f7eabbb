#!/usr/bin/env python3
"""The whole Switchyard layer at world 1 against Hugging Face's MixtralSparseMoeBlock on
the same BF16 weights and tokens, at T = 8192 for (E=8, k=2, H=4096, F=14336) and
(E=64, k=8, H=2048, F=1408): the median time of a forward of each (CUDA events; the block
with each experts backend transformers offers that fits, the fastest one compared), and
how far the outputs are apart.

Agreement is judged row by row. PyTorch computes the router logits in BF16, Switchyard in
F32; where the two round to different top-k sets, or the F32 logits of the k-th and
(k+1)-th expert are within 1e-4 of each other, the row legitimately goes to other experts.
Those rows are counted and left out; on the others the median relative error must be at
BF16 rounding (<= 1e-2) and the largest under 5e-2 (a row with one other expert is off by
about 0.3).

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


def routing_ambiguous(x, gate_weight, k):
    """Rows whose top-k set differs between BF16 and F32 logits, or whose k-th and (k+1)-th
    F32 logits are within 1e-4."""
    with torch.no_grad():
        logits32 = x.float() @ gate_weight.float().t()
        logits16 = torch.nn.functional.linear(x, gate_weight).float()
        top32 = torch.topk(logits32, k + 1, dim=-1)
        set32 = torch.sort(top32.indices[:, :k], dim=-1).values
        set16 = torch.sort(torch.topk(logits16, k, dim=-1).indices, dim=-1).values
        differs = (set32 != set16).any(dim=-1)
        close = (top32.values[:, k - 1] - top32.values[:, k]) < 1e-4
    return (differs | close).cpu().numpy()


def make_block(config, implementation):
    """The block with this experts backend, or None where this transformers lacks it."""
    try:
        config._experts_implementation = implementation
        block = MixtralSparseMoeBlock(config).to("cuda", torch.bfloat16).eval()
    except Exception:  # noqa: BLE001 - an older or newer transformers: skip the backend
        return None
    return block


def main():
    bench, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    ok = True
    for E, k, H, F in SHAPES:
        config = MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=E,
                               num_experts_per_tok=k)
        torch.manual_seed(0)
        x = torch.randn(1, TOKENS, H, device="cuda").to(torch.bfloat16)
        block, y_ref, timings = None, None, {}
        # batched_mm copies the weights per token: out of memory at these sizes.
        for implementation in ("grouped_mm", "eager"):
            candidate = make_block(config, implementation)
            if candidate is None:
                continue
            if block is None:
                torch.manual_seed(1)
                for p in candidate.parameters():
                    torch.nn.init.normal_(p, std=0.02)
                block = candidate
            else:
                candidate.load_state_dict(block.state_dict())
            try:
                with torch.no_grad():
                    out = candidate(x)
                    y = (out[0] if isinstance(out, tuple) else out).float()[0].cpu().numpy()
                    timings[implementation] = time_ms(lambda: candidate(x))
            except Exception as error:  # noqa: BLE001 - report the backend, go on
                print(f"experts backend {implementation} failed: {error}", file=sys.stderr)
                continue
            if y_ref is None:
                y_ref = y
            if candidate is not block:
                del candidate
        if block is None or y_ref is None:
            print(f"| E={E} k={k} H={H} F={F} | | transformers block failed | | |")
            ok = False
            continue
        fastest = min(timings, key=timings.get)
        torch_ms = timings[fastest]
        gate_weight = block.gate.weight.detach().contiguous()
        ambiguous = routing_ambiguous(x[0], gate_weight, k)
        tensors = {"gate.weight": gate_weight}
        tensors.update(expert_tensors(block, E, H))
        checkpoint = os.path.join(work, f"mixtral_{E}.safetensors")
        save_file({n: t.cpu() for n, t in tensors.items()}, checkpoint)
        tokens = os.path.join(work, f"tokens_{E}.npy")
        np.save(tokens, x.float()[0].cpu().numpy())
        del block, tensors
        torch.cuda.empty_cache()
        # Each way cuda_swiglu splits its GEMMs (bench_gpu layer's GEMM argument,
        # NAME[:GRANULE[:EXPERTS]]): the plugin's default must be faster than transformers;
        # every one must agree with it.
        measured_default = False
        for gemm in ("per_expert", "batched", "batched:128:8", "grouped:128:8"):
            output = os.path.join(work, f"y_{E}_{gemm}.npy")
            run = subprocess.run([bench, "layer", checkpoint, tokens, str(k), output, "10", gemm],
                                 capture_output=True, text=True)
            shape = f"E={E} k={k} H={H} F={F}, gemm {gemm}"
            used = re.search(r"gemm=(\S+) default_gemm=(\S+)", run.stdout or "")
            default = used is not None and used.group(1) == used.group(2)
            if default:
                shape += " (default)"
                measured_default = True
            if run.returncode != 0:
                print(f"| {shape} | switchyard failed: {run.stderr.strip()} | | | |")
                ok = False
                continue
            layer_ms = float(re.search(r"layer_ms=([0-9.]+)", run.stdout).group(1))
            y = np.load(output)
            row_error = (np.linalg.norm(y - y_ref, axis=1) /
                         np.maximum(np.linalg.norm(y_ref, axis=1), 1e-30))
            clear = row_error[~ambiguous]
            median, worst = float(np.median(clear)), float(np.max(clear))
            agree = median <= 1e-2 and worst <= 5e-2
            faster = layer_ms < torch_ms
            ok = ok and agree and (faster or not default)
            others = ", ".join(f"{name} {ms:.2f} ms" for name, ms in timings.items())
            print(f"| {shape} | {layer_ms:.2f} ms | {torch_ms:.2f} ms ({others}) "
                  f"| {torch_ms / layer_ms:.2f}x {'(faster)' if faster else '(SLOWER)'} "
                  f"| {int(ambiguous.sum())} of {len(ambiguous)} rows routed apart by BF16 logits; "
                  f"the rest: row error median {median:.2e}, max {worst:.2e} "
                  f"{'ok' if agree else 'DISAGREE'} |")
        if not measured_default:
            print(f"| E={E} k={k} H={H} F={F}, gemm (default) | not among the splits run | | | |")
            ok = False
        # The worst-case mode ([runtime] max_tokens_per_rank = T: fixed blocks, no host
        # wait) against the counted forward, at a decoding batch and at this one: the same
        # bytes of y, and both times.
        for count in (128, TOKENS):
            subset = os.path.join(work, f"tokens_{E}_{count}.npy")
            np.save(subset, np.load(tokens)[:count])
            output = os.path.join(work, f"y_{E}_{count}_modes.npy")
            run = subprocess.run([bench, "layer", checkpoint, subset, str(k), output, "10"],
                                 capture_output=True, text=True,
                                 env=dict(os.environ, SWITCHYARD_BENCH_WORST_CASE="1"))
            shape = f"E={E} k={k} H={H} F={F}, T={count}"
            found = re.search(r"layer_ms=([0-9.]+).*worst_case_ms=([0-9.]+) worst_case_same=(\d) "
                              r"worst_case_rel=(\S+)", run.stdout or "", re.S)
            if run.returncode != 0 or found is None:
                print(f"| {shape}, worst-case mode | failed: {(run.stderr or '').strip()} | | | |")
                ok = False
                continue
            same, rel = found.group(3) == "1", float(found.group(4))
            close = rel <= 1e-2
            ok = ok and close
            agreement = "the same bytes" if same else f"max diff {rel:.1e} of max |y|"
            print(f"| {shape}, worst-case mode | {float(found.group(2)):.2f} ms "
                  f"| counted {float(found.group(1)):.2f} ms "
                  f"| y: {agreement} {'ok' if close else 'DIFFERS'} | |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
