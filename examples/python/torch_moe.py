"""A PyTorch MoE block whose routing, dispatch and combine run through Switchyard, checked
against a pure-PyTorch Mixtral-style sparse MoE block on the same weights.

    PYTHONPATH=build/python python3 examples/python/torch_moe.py [--ranks 2] [--tokens 64]
    mpirun -np 2 python3 examples/python/torch_moe.py --transport mpi   # one rank per process

`SwitchyardMoeBlock` keeps the gate and the experts as ordinary PyTorch modules. Per step:
PyTorch computes the router logits; Switchyard's top-k router turns them into (experts,
weights) exactly as Mixtral does (softmax over all experts, top-k, renormalised);
`Runtime.dispatch` sends each token's row to the ranks of its experts; PyTorch runs each
local expert on the rows its rank received (NumPy views of Switchyard's buffers, wrapped
with torch.from_numpy: no copies); `Runtime.combine` weighs, returns and sums the results
into the output tensor (written in place through DLPack).

Inference only: Switchyard has no backward pass yet, so the block refuses inputs that
require grad (run it under torch.no_grad() or torch.inference_mode()).
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

import switchyard


class MixtralExpert(nn.Module):
    """w2(silu(w1 x) * w3 x), as Mixtral's MixtralBlockSparseTop2MLP."""

    def __init__(self, hidden, ffn_hidden):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn_hidden, bias=False)
        self.w2 = nn.Linear(ffn_hidden, hidden, bias=False)
        self.w3 = nn.Linear(hidden, ffn_hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MixtralSparseMoeBlock(nn.Module):
    """The pure-PyTorch reference: Mixtral's sparse MoE block (as in Hugging Face's
    MixtralSparseMoeBlock, without jitter), on x [T,H]."""

    def __init__(self, hidden, ffn_hidden, num_experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(MixtralExpert(hidden, ffn_hidden) for _ in range(num_experts))

    def forward(self, x):
        logits = self.gate(x)
        weights = F.softmax(logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        weights /= weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        y = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            out = expert(x[token]) * weights[token, slot, None]
            y.index_add_(0, token, out.to(x.dtype))
        return y


class SwitchyardMoeBlock(nn.Module):
    """The same block with routing, dispatch and combine through Switchyard. Takes the
    gate and experts of a MixtralSparseMoeBlock (shared, not copied). `runtime` is a
    switchyard.Runtime whose [model] has the same hidden size and expert count; its ranks
    hold the experts (contiguous blocks), and this process computes the experts of the
    ranks it hosts."""

    def __init__(self, block, runtime):
        super().__init__()
        if runtime.hidden != block.gate.in_features or runtime.num_experts != len(block.experts):
            raise ValueError("the runtime's [model] hidden and num_experts must match the block's")
        self.gate = block.gate
        self.experts = block.experts
        self.runtime = runtime
        # Mixtral's routing: softmax over all experts, top-k, weights renormalised.
        self.router = switchyard.Router("topk", num_experts=len(block.experts),
                                        top_k=block.top_k, score="softmax", pre_softmax=True,
                                        normalize=True)

    def forward(self, x):
        if x.requires_grad or (torch.is_grad_enabled() and self.gate.weight.requires_grad):
            raise NotImplementedError("SwitchyardMoeBlock is inference only (Switchyard has no "
                                      "backward pass yet): call it under torch.no_grad()")
        x = x.contiguous()
        logits = self.gate(x).float().contiguous()
        plan = self.router.route(logits)          # (experts int32 [T,K], weights f32 [T,K])
        dispatched = self.runtime.dispatch(x, plan)  # x is read in place through DLPack
        for part in dispatched.parts:
            rows = torch.from_numpy(part["expert_input"])     # Switchyard's buffer, no copy
            results = torch.from_numpy(part["expert_output"])
            first = 0
            for e, count in zip(part["experts"], part["rows_per_expert"]):
                if count:
                    results[first:first + count] = self.experts[e](rows[first:first + count])
                first += count
        y = torch.empty_like(x)
        self.runtime.combine(dispatched, out=y)       # written in place through DLPack
        return y


def runtime_for(block, hidden, ffn_hidden, ranks, transport):
    """A runtime whose model matches the block (its own expert weights are not used: the
    experts run in PyTorch)."""
    config = f"""
[runtime]
transport = "{transport}"
[model]
hidden = {hidden}
ffn_hidden = {ffn_hidden}
num_experts = {len(block.experts)}
[router]
top_k = {block.top_k}
"""
    overrides = {"runtime.ranks": str(ranks)} if ranks else {}
    return switchyard.Runtime.from_string(config, overrides)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ffn-hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2, help="in-process ranks (inproc only)")
    parser.add_argument("--transport", default="inproc")
    args = parser.parse_args(argv)

    torch.manual_seed(0)  # the same weights on every rank
    block = MixtralSparseMoeBlock(args.hidden, args.ffn_hidden, args.experts, args.top_k)
    runtime = runtime_for(block, args.hidden, args.ffn_hidden,
                          args.ranks if args.transport == "inproc" else 0, args.transport)
    ep_block = SwitchyardMoeBlock(block, runtime)
    # Each process its own tokens: the block is per token, so each checks its own.
    generator = torch.Generator().manual_seed(1 + runtime.ranks[0])
    x = torch.randn(args.tokens, args.hidden, generator=generator)
    with torch.no_grad():
        expected = block(x)
        y = ep_block(x)
    relative = ((y - expected).abs().max() / expected.abs().max()).item()
    print(f"rank(s) {runtime.ranks} of {runtime.world_size}: {args.tokens} tokens, "
          f"{args.experts} experts, top-{args.top_k}: max relative difference to the "
          f"pure-PyTorch block {relative:.2e}")
    return 0 if relative <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
