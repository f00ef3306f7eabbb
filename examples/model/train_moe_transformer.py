"""A small decoder-only MoE transformer trained with expert parallelism for its MoE layers
and data parallelism for everything else, on Switchyard and torch.distributed.

    # the reference: one process, a pure-PyTorch sparse MoE block in every layer
    PYTHONPATH=build/python python3 examples/model/train_moe_transformer.py --steps 100
    # 4 in-process ranks (the MoE layers' experts on 4 Switchyard ranks, threads here)
    PYTHONPATH=build/python python3 examples/model/train_moe_transformer.py --ranks 4
    # 4 processes, EP 2 x DP 2: MPI under mpirun, UCX under switchyard launch
    mpirun -np 4 -x PYTHONPATH -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29600 \\
        python3 examples/model/train_moe_transformer.py --ep-size 2 --transport mpi
    switchyard launch -n 4 -- python3 examples/model/train_moe_transformer.py --ep-size 2

The model: byte-level tokens, an embedding, `--layers` blocks of RMSNorm + causal
attention + RMSNorm + a sparse MoE layer (Mixtral-style: softmax, top-k, renormalised;
SwiGLU experts), a final RMSNorm and a language-model head. The text is GNU GPL version 3
as Debian's base-files package ships it (/usr/share/common-licenses/GPL-3).

The two roles of a rank: the embedding, attention, norms, head and routers are
data-parallel (every process holds them; each computes its own share of the batch; their
gradients are summed over all processes with torch.distributed's gloo), while the experts
are expert-parallel (`switchyard.torch.MoeBlock`: each token's row goes to the rank of its
expert and back; an expert's gradient is computed where it lives and summed over its DP
group, here by the same all-reduce, to which the processes that do not hold it add zero).
Every process therefore keeps the same weights. The loss is the next-byte cross-entropy
plus `--aux-coeff` times Switch's load-balancing loss over the whole batch (its per-expert
fractions summed over all processes first), so that a run on W processes computes what
the one-process reference computes.

Rank 0 prints the loss per step, tokens per second, the expert-load imbalance per layer and
the time and bytes of the DP (all-reduce) and EP (all-to-all) parts; `--json FILE` writes
{"loss": [...], ...}; `--save FILE` writes the weights as safetensors with Hugging Face
names (the MoE layers as Mixtral's, so `switchyard run` loads them with
prefix = "model.layers.{layer}.block_sparse_moe.") and `--load FILE` reads them back.
"""
import argparse
import json
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

TEXT = "/usr/share/common-licenses/GPL-3"
VOCAB = 256


class RMSNorm(nn.Module):
    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    """Causal multi-head self-attention."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        batch, length, hidden = x.shape
        d = hidden // self.heads

        def split(t):
            return t.view(batch, length, self.heads, d).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = q @ k.transpose(-1, -2) / d ** 0.5
        mask = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(mask, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, hidden))


class Expert(nn.Module):
    def __init__(self, hidden, ffn):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)
        self.w2 = nn.Linear(ffn, hidden, bias=False)
        self.w3 = nn.Linear(hidden, ffn, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ReferenceMoeBlock(nn.Module):
    """The pure-PyTorch sparse MoE block (Hugging Face's Mixtral block, written out), with
    MoeBlock's state_dict names and call."""

    def __init__(self, hidden, ffn, experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, ffn) for _ in range(experts))

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.gate(x)
        weights = F.softmax(logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(selected == e)
            if token.numel():
                y.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return y.reshape(shape), logits


class Block(nn.Module):
    def __init__(self, hidden, heads, moe):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = Attention(hidden, heads)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.block_sparse_moe = moe

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        y, logits = self.block_sparse_moe(self.post_attention_layernorm(x))
        return x + y, logits


class Model(nn.Module):
    def __init__(self, hidden, heads, moe_blocks):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, hidden)
        self.layers = nn.ModuleList(Block(hidden, heads, moe) for moe in moe_blocks)
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, tokens):
        h = self.embed_tokens(tokens)
        all_logits = []
        for layer in self.layers:
            h, router_logits = layer(h)
            all_logits.append(router_logits)
        return self.lm_head(self.norm(h)), all_logits


def initial_weights(model, seed):
    """The same weights for every way of running: drawn per parameter name, in name order,
    from one generator (so the module construction order does not matter)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in sorted(model.named_parameters()):
        if name.endswith("layernorm.weight") or name == "norm.weight":
            state[name] = torch.ones_like(p)
        else:
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            std = 0.02 if "embed" in name else fan_in ** -0.5
            state[name] = torch.randn(p.shape, generator=generator) * std
    return state


def batch_of(text, step, batch, length, seed):
    """The step's global batch: `batch` windows of length+1 bytes at seeded offsets."""
    offsets = np.random.default_rng([seed, step]).integers(0, len(text) - length - 1, batch)
    return torch.from_numpy(np.stack([text[o:o + length + 1] for o in offsets]).astype(np.int64))


def save_safetensors(path, tensors):
    """Writes f32 tensors as safetensors (written out here: the format is a JSON header)."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        data = tensors[name].detach().contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))
    os.replace(tmp, path)  # a crash leaves the old file or the new one


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(data[begin:end], "<f4").copy()
                                     .reshape(info["shape"]))
    return out


def hf_names(state):
    """Our parameter names as a Hugging Face Mixtral checkpoint names them."""
    return {("lm_head.weight" if name == "lm_head.weight" else "model." + name): t
            for name, t in state.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--ep-size", type=int, default=0,
                        help="EP group size (processes from the launcher; default: all)")
    parser.add_argument("--ranks", type=int, default=0,
                        help="in-process Switchyard ranks (one process)")
    parser.add_argument("--transport", default="", help="mpi, ucx (default: ucx under a "
                        "launcher, inproc for --ranks)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step, all ranks")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--aux-coeff", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="rank 0 writes the run's figures here")
    parser.add_argument("--save", default="", help="rank 0 writes the trained weights here")
    parser.add_argument("--load", default="", help="start from these weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    launched = int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))) > 1
    reference = not launched and args.ranks == 0
    runtime = None
    rank, world = 0, 1
    if not reference:
        import switchyard.torch as st
        transport = args.transport or ("ucx" if launched else "inproc")
        overrides = {"runtime.timeout_s": "120"}
        if args.ep_size:
            overrides["runtime.ep_size"] = str(args.ep_size)
        runtime = st.make_runtime(hidden=args.hidden, ffn_hidden=args.ffn,
                                  num_experts=args.experts, top_k=args.top_k,
                                  layers=args.layers, ranks=args.ranks or None,
                                  transport=transport, **overrides)
        if launched:
            rank, world = runtime.ranks[0], runtime.world_size
            # torch.distributed beside Switchyard's own store: the next port.
            address = os.environ.get("MASTER_ADDR", "127.0.0.1")
            port = int(os.environ.get("MASTER_PORT", "29500")) + 1
            dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=rank,
                                    world_size=world)
        moe = [st.MoeBlock(runtime, args.top_k, ffn_hidden=args.ffn, layer=layer)
               for layer in range(args.layers)]
    else:
        moe = [ReferenceMoeBlock(args.hidden, args.ffn, args.experts, args.top_k)
               for _ in range(args.layers)]
    if args.batch % world:
        parser.error(f"--batch {args.batch} must divide among {world} processes")

    model = Model(args.hidden, args.heads, moe)
    if args.load:
        loaded = load_safetensors(args.load)
        model.load_state_dict({name[len("model."):] if name.startswith("model.") else name: t
                               for name, t in loaded.items()})
    else:
        model.load_state_dict(initial_weights(model, args.seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    with open(TEXT, "rb") as f:
        text = np.frombuffer(f.read(), np.uint8)

    losses, imbalances, dp_seconds, step_seconds = [], [], 0.0, 0.0
    per_rank = args.batch // world
    for step in range(args.steps):
        started = time.perf_counter()
        tokens = batch_of(text, step, args.batch, args.length, args.seed)
        tokens = tokens[rank * per_rank:(rank + 1) * per_rank]
        logits, router_logits = model(tokens[:, :-1])
        # This process's share of the batch's mean cross-entropy.
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1),
                             reduction="sum") / (args.batch * args.length)
        # Switch's aux loss over the whole batch: E Σ_e f_e P_e, the fractions f (no
        # gradient) summed over every process first, P this process's share of the mean.
        aux = torch.zeros(())
        layer_counts = []
        for z in router_logits:
            p = torch.softmax(z, dim=-1)
            counts = torch.zeros(args.experts)
            counts.index_add_(0, torch.topk(p, args.top_k, dim=-1)[1].reshape(-1),
                              torch.ones(z.shape[0] * args.top_k))
            if world > 1:
                dist.all_reduce(counts)
            layer_counts.append(counts)
            total = args.batch * args.length
            aux = aux + args.experts * ((counts / (total * args.top_k)) * p.sum(0) / total).sum()
        loss = ce + args.aux_coeff * aux
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        for p in model.parameters():
            if p.grad is None:  # an expert no token of this process reached: zero, as in
                p.grad = torch.zeros_like(p)  # every way of running (the optimizer steps all)
        dp_started = time.perf_counter()
        reported = loss.detach().clone()
        if world > 1:
            # The DP part: every gradient summed over the processes (an expert's only where
            # it lives: the others add zero), and the loss with them, in one all-reduce.
            grads = [p.grad for p in model.parameters()]
            flat = torch.cat([g.reshape(-1) for g in grads] + [reported.reshape(1)])
            dist.all_reduce(flat)
            at = 0
            for g in grads:
                g.copy_(flat[at:at + g.numel()].view_as(g))
                at += g.numel()
            reported = flat[at]
        dp_seconds += time.perf_counter() - dp_started
        optimizer.step()
        step_seconds += time.perf_counter() - started
        losses.append(reported.item())
        imbalances.append([(c.max() / c.mean()).item() for c in layer_counts])
        if rank == 0:
            print(f"step {step + 1}: loss {losses[-1]:.5f}  imbalance per layer "
                  + " ".join(f"{v:.2f}" for v in imbalances[-1]), flush=True)

    figures = {
        "loss": losses,
        "imbalance": imbalances,
        "tokens_per_s": args.steps * args.batch * args.length / step_seconds,
        "processes": world,
        "in_process_ranks": args.ranks,
        "ep_size": args.ep_size or (runtime.world_size if runtime else 1),
        "dp_s": dp_seconds,
        "dp_bytes_per_step": sum(p.numel() * 4 for p in model.parameters()) if world > 1 else 0,
    }
    if runtime is not None:
        figures["ep_s"] = sum(runtime.stats(layer=l)["timings"]["dispatch_s"]
                              + runtime.stats(layer=l)["timings"]["combine_s"]
                              for l in range(args.layers))
        figures["ep_bytes_per_step"] = sum(runtime.stats(layer=l)["dispatch_bytes"]
                                           + runtime.stats(layer=l)["combine_bytes"]
                                           for l in range(args.layers))
    if rank == 0:
        print(f"{figures['tokens_per_s']:.0f} tokens/s; DP part {dp_seconds:.2f} s "
              f"({figures['dp_bytes_per_step']} bytes all-reduced per step)"
              + (f"; EP part (last step) {figures['ep_s'] * 1e3:.1f} ms, "
                 f"{figures['ep_bytes_per_step']} bytes through all-to-all"
                 if runtime is not None else ""))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f)
        if args.save:
            save_safetensors(args.save, hf_names(model.state_dict()))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
