"""A PyTorch MoE block whose routing, dispatch and combine run through Switchyard, checked
against a pure-PyTorch Mixtral-style sparse MoE block on the same weights.

    PYTHONPATH=build/python python3 examples/python/torch_moe.py [--ranks 2] [--tokens 64]
    mpirun -np 2 python3 examples/python/torch_moe.py --transport mpi   # one rank per process

`SwitchyardMoeBlock` keeps the gate and the experts as ordinary PyTorch modules. Per step:
PyTorch computes the router logits; Switchyard's top-k router turns them into (experts,
weights) exactly as Mixtral does (softmax over all experts, top-k, renormalised);
`Runtime.dispatch` sends each token's row to the ranks of its experts; PyTorch runs each
local expert on the rows its rank received (NumPy views of Switchyard's buffers, wrapped
with torch.from_numpy: no copies); `Runtime.combine` weighs, returns and sums the results.

It trains: dispatch and combine are torch.autograd.Functions whose backwards are
Switchyard's (`Runtime.dispatch_backward`, `Runtime.combine_backward`), the experts and the
routing weights are PyTorch's own, so `loss.backward()` gives the gradients of x, the gate
and every expert (the example checks them against the pure-PyTorch block's too).
"""
import argparse
import sys
import types

import numpy as np

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


class _Dispatch(torch.autograd.Function):
    """x -> the rows each local rank received (one tensor per part, views of Switchyard's
    buffers). Backward: dx = per token, the sum of its rows' gradients (dispatch_backward)."""

    @staticmethod
    def forward(ctx, x, state, experts, weights):
        state.dispatched = state.runtime.dispatch(x.detach(), (experts, weights.detach()),
                                                  layer=state.layer)
        ctx.state = state
        return tuple(torch.from_numpy(p["expert_input"]) for p in state.dispatched.parts)

    @staticmethod
    def backward(ctx, *grad_rows):
        parts = ctx.state.dispatched.parts
        grads = [np.zeros_like(p["expert_input"]) if g is None else g.contiguous().numpy()
                 for g, p in zip(grad_rows, parts)]
        dx = ctx.state.runtime.dispatch_backward(ctx.state.dispatched, grads)
        return torch.from_numpy(dx), None, None, None


class _Combine(torch.autograd.Function):
    """The experts' outputs and the routing weights -> y (combine). Backward: each output's
    gradient is its slot's weight times dy, each weight's <dy, its expert's output>
    (combine_backward)."""

    @staticmethod
    def forward(ctx, weights, state, *outputs):
        arrays = [o.detach().contiguous().numpy() for o in outputs]
        y = torch.empty(state.dispatched.num_tokens, state.runtime.hidden)
        state.runtime.combine(state.dispatched, arrays, out=y)
        ctx.state, ctx.arrays = state, arrays
        return y

    @staticmethod
    def backward(ctx, dy):
        d_outputs, d_weights = ctx.state.runtime.combine_backward(
            ctx.state.dispatched, dy.contiguous().numpy(), ctx.arrays)
        return (torch.from_numpy(d_weights), None, *(torch.from_numpy(d) for d in d_outputs))


class SwitchyardMoeBlock(nn.Module):
    """The same block with routing, dispatch and combine through Switchyard. Takes the
    gate and experts of a MixtralSparseMoeBlock (shared, not copied). `runtime` is a
    switchyard.Runtime whose [model] has the same hidden size and expert count; its ranks
    hold the experts (contiguous blocks), and this process computes the experts of the
    ranks it hosts. Differentiable: dispatch and combine have Switchyard backwards, the
    experts and the routing weights are PyTorch's own. The blocks of a model share one
    runtime, each its own `layer` of it (`[model] layers`, one per MoE block), so that
    they share its transports and buffers and its statistics are per block."""

    def __init__(self, block, runtime, layer=0):
        super().__init__()
        if runtime.hidden != block.gate.in_features or runtime.num_experts != len(block.experts):
            raise ValueError("the runtime's [model] hidden and num_experts must match the block's")
        self.gate = block.gate
        self.experts = block.experts
        self.runtime = runtime
        if not 0 <= layer < runtime.num_layers:
            raise ValueError(f"layer {layer}: the runtime has {runtime.num_layers} layers")
        self.layer = layer
        self.top_k = block.top_k
        # Mixtral's selection: the top-k of softmax(z) (that is, of z).
        self.router = switchyard.Router("topk", num_experts=len(block.experts), top_k=block.top_k)

    def forward(self, x):
        x = x.contiguous()
        logits = self.gate(x)
        selected, _ = self.router.route(logits.detach().float().contiguous())
        selected = torch.from_numpy(selected).long()
        # Mixtral's weights: softmax over the selected logits (differentiable in PyTorch).
        weights = torch.softmax(torch.gather(logits, 1, selected), dim=1).to(x.dtype)
        state = types.SimpleNamespace(runtime=self.runtime, layer=self.layer)
        rows = _Dispatch.apply(x, state, selected.int(), weights)
        outputs = []
        for part, part_rows in zip(state.dispatched.parts, rows):
            pieces, first = [], 0
            for e, count in zip(part["experts"], part["rows_per_expert"]):
                if count:
                    pieces.append(self.experts[e](part_rows[first:first + count]))
                first += count
            outputs.append(torch.cat(pieces) if pieces else part_rows * 0)
        return _Combine.apply(weights, state, *outputs)


def runtime_for(block, hidden, ffn_hidden, ranks, transport, layers=1):
    """A runtime whose model matches the block (its own expert weights are not used: the
    experts run in PyTorch), with `layers` MoE layers for a model of that many blocks."""
    config = f"""
[runtime]
transport = "{transport}"
[model]
hidden = {hidden}
ffn_hidden = {ffn_hidden}
num_experts = {len(block.experts)}
layers = "{'' if layers == 1 else f'0-{layers - 1}'}"
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
    x_reference = x.clone().requires_grad_()
    expected = block(x_reference)
    dy = torch.randn(expected.shape, generator=generator)
    (expected * dy).sum().backward()
    reference_grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                       for n, p in block.named_parameters()}
    block.zero_grad()
    x_switchyard = x.clone().requires_grad_()
    y = ep_block(x_switchyard)
    (y * dy).sum().backward()

    def relative(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    compared = [relative(y.detach(), expected.detach()),
                relative(x_switchyard.grad, x_reference.grad)]
    what = "output and dx"
    if len(runtime.ranks) == runtime.world_size:
        # One process holds every rank: its parameter gradients come from all the tokens, as
        # the pure-PyTorch block's do. (With a rank per process, an expert's gradient lives
        # on its rank and covers every rank's tokens; the gate's needs the job's sum.)
        compared += [relative(p.grad, reference_grads[n]) for n, p in block.named_parameters()
                     if reference_grads[n].abs().max() > 1e-6]
        what = "output, dx and every parameter's gradient"
    worst = max(compared)
    print(f"rank(s) {runtime.ranks} of {runtime.world_size}: {args.tokens} tokens, "
          f"{args.experts} experts, top-{args.top_k}: max relative difference to the "
          f"pure-PyTorch block {worst:.2e} ({what})")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
