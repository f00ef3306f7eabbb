"""Switchyard: an expert-parallel MoE runtime, from Python.

    import numpy as np, switchyard
    rt = switchyard.Runtime("examples/configs/demo.toml", overrides={"runtime.ranks": "2"})
    y = rt.forward(np.ones((16, rt.hidden), np.float32))

    # Or around experts of your own: route, dispatch, compute, combine.
    x = np.ones((16, rt.hidden), np.float32)
    dispatched = rt.dispatch(x, rt.route(x))
    for part in dispatched.parts:   # one per rank this process hosts
        part["expert_output"][:] = my_experts(part["experts"], part["rows_per_expert"],
                                              part["expert_input"])
    y = rt.combine(dispatched)

Tensors: NumPy float32 arrays or any object with __dlpack__ (PyTorch CPU tensors), used
in place (no copies); `forward(x, out=...)` writes into a tensor of yours. With a device
data path (`[runtime] data_path`), `forward` also takes tokens on that device through
DLPack and returns a `DeviceTensor` (DLPack, no copy) unless `out` is given. Errors raise
`switchyard.Error` subclasses that also derive from the matching built-in exception
(InvalidArgumentError is a ValueError, TimeoutError a TimeoutError, ...), each with
`.code`. `route(logits, policy, **options)` and `Router` run a routing policy alone.
`backward` and `parameters` train. `switchyard.torch` (imported on its own: it needs
PyTorch) has `MoeBlock`, a PyTorch module with a Hugging Face MoE block's state_dict names.
"""
from ._switchyard import (  # noqa: F401
    AbiMismatchError,
    DeviceTensor,
    Dispatch,
    Error,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PeerFailedError,
    Router,
    Runtime,
    SystemError,
    TimeoutError,
    UnavailableError,
    __version__,
)


def route(logits, policy="topk", bias=None, token_ids=None, **options):
    """Routes logits [T,E] float32 with a policy alone (no transport, no model):
    returns (experts [T,K] int32, weights [T,K] float32). `options` are the policy's
    [router] keys, e.g. route(logits, "topk", top_k=2, normalize=True); `token_ids` [T]
    the tokens' ids, for a policy that routes by them (route(logits, "hash",
    table="tid2eid.npy", token_ids=ids))."""
    router = Router(policy, num_experts=logits.shape[1], bias=bias, **options)
    return router.route(logits, token_ids=token_ids)
