"""Switchyard: an expert-parallel MoE runtime, from Python.

    import numpy as np, switchyard
    rt = switchyard.Runtime("examples/configs/demo.toml", overrides={"runtime.ranks": "2"})
    y = rt.forward(np.ones((16, rt.hidden), np.float32))

Tensors: NumPy float32 arrays or any object with __dlpack__ (PyTorch CPU tensors), used
in place (no copies); `forward(x, out=...)` writes into a tensor of yours. Errors raise
`switchyard.Error` subclasses that also derive from the matching built-in exception
(InvalidArgumentError is a ValueError, TimeoutError a TimeoutError, ...), each with
`.code`. Inference only: there is no backward pass yet.
"""
from ._switchyard import (  # noqa: F401
    AbiMismatchError,
    Error,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PeerFailedError,
    Runtime,
    SystemError,
    TimeoutError,
    UnavailableError,
    __version__,
)
