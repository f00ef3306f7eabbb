"""switchyard.torch's MoE block checked against a pure-PyTorch Mixtral-style sparse MoE
block on the same weights: outputs, dx and (with every rank in this process) every
parameter's gradient.

    PYTHONPATH=build/python python3 examples/python/torch_moe.py [--ranks 2] [--tokens 64]
    mpirun -np 2 python3 examples/python/torch_moe.py --transport mpi   # one rank per process

`switchyard.torch.MoeBlock` has the Hugging Face block's state_dict names, so the reference
block's weights load into it as they are. Per step PyTorch computes the router logits,
Switchyard's top-k router selects the experts, `Runtime.dispatch` sends each token's row
to the ranks of its experts, PyTorch runs each local expert on the rows its rank received
(views of Switchyard's buffers: no copies), and `Runtime.combine` weighs, returns and sums
the results; dispatch and combine have Switchyard backwards, so `loss.backward()` reaches
x, the gate and every expert.
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

import switchyard.torch as st


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


def switchyard_block(block, runtime, layer=0):
    """switchyard.torch's block with `block`'s weights (copied through its state_dict)."""
    ffn_hidden = block.experts[0].w1.out_features
    ours = st.MoeBlock(runtime, block.top_k, ffn_hidden=ffn_hidden, layer=layer)
    ours.load_state_dict(block.state_dict())
    return ours


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
    runtime = st.make_runtime(hidden=args.hidden, ffn_hidden=args.ffn_hidden,
                              num_experts=args.experts, top_k=args.top_k,
                              ranks=args.ranks if args.transport == "inproc" else None,
                              transport=args.transport)
    ep_block = switchyard_block(block, runtime)
    # Each process its own tokens: the block is per token, so each checks its own.
    generator = torch.Generator().manual_seed(1 + runtime.ranks[0])
    x = torch.randn(args.tokens, args.hidden, generator=generator)
    x_reference = x.clone().requires_grad_()
    expected = block(x_reference)
    dy = torch.randn(expected.shape, generator=generator)
    (expected * dy).sum().backward()
    reference_grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                       for n, p in block.named_parameters()}
    x_switchyard = x.clone().requires_grad_()
    y, _ = ep_block(x_switchyard)
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
        compared += [relative(p.grad, reference_grads[n]) for n, p in ep_block.named_parameters()
                     if reference_grads[n].abs().max() > 1e-6]
        what = "output, dx and every parameter's gradient"
    worst = max(compared)
    print(f"rank(s) {runtime.ranks} of {runtime.world_size}: {args.tokens} tokens, "
          f"{args.experts} experts, top-{args.top_k}: max relative difference to the "
          f"pure-PyTorch block {worst:.2e} ({what})")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
