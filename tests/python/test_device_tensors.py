"""Tensors on a device through the Python module: a pretend CUDA device (the fixture plugins
of tests/fixtures/plugins: host memory that says it is cuda:0, its streams' work queued on a
thread of their own) takes x and out as DLPack tensors on cuda:0 where they are, hands its
own outputs back as DeviceTensor objects (DLPack, no copy), and gives the bytes of the host
data path with the same experts; bad input is refused with the host path's messages. A
NumPy array's memory stands for the device's: ctypes builds the DLPack capsules that say
cuda:0, and reads the ones the module gives back."""
import ctypes
import os

import numpy as np
import pytest

import switchyard

FIXTURES = os.environ["SWITCHYARD_FIXTURE_PLUGIN_DIR"]
KDLCUDA = 2


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int),
                ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


class PretendCuda:
    """A C-contiguous NumPy array's memory, exported through DLPack as cuda:0."""

    def __init__(self, array):
        assert array.flags["C_CONTIGUOUS"]
        self.array = array
        self.shape = (ctypes.c_int64 * array.ndim)(*array.shape)
        code = {np.dtype(np.float32): 2, np.dtype(np.float64): 2, np.dtype(np.int32): 0}
        self.managed = DLManagedTensor()
        t = self.managed.dl_tensor
        t.data = array.ctypes.data
        t.device = DLDevice(KDLCUDA, 0)
        t.ndim = array.ndim
        t.dtype = DLDataType(code[array.dtype], array.dtype.itemsize * 8, 1)
        t.shape = self.shape
        t.strides = None
        t.byte_offset = 0

    def __dlpack__(self, stream=None):
        # The consumer's stream, as DLPack's protocol passes it (kept for the tests).
        self.stream = stream
        # No deleter: this object keeps the memory and the structures alive.
        return _capsule_new(ctypes.addressof(self.managed), b"dltensor", None)

    def __dlpack_device__(self):
        return (KDLCUDA, 0)


def read_device_tensor(tensor):
    """The float32 matrix a DLPack object on cuda:0 describes, copied out, and its address."""
    assert tensor.__dlpack_device__() == (KDLCUDA, 0)
    capsule = tensor.__dlpack__()
    managed = DLManagedTensor.from_address(_capsule_pointer(capsule, b"dltensor"))
    t = managed.dl_tensor
    assert t.device.device_type == KDLCUDA and t.ndim == 2
    assert (t.dtype.code, t.dtype.bits) == (2, 32)
    rows, cols = t.shape[0], t.shape[1]
    values = np.ctypeslib.as_array((ctypes.c_float * (rows * cols)).from_address(t.data))
    return values.reshape(rows, cols).copy(), t.data


def runtimes(ranks, transport="inproc"):
    config = (f'[runtime]\nranks = {ranks}\nplugin_dirs = ["{FIXTURES}"]\n'
              '[experts]\nkernel = "pretend_swiglu"\n[router]\ntop_k = 2\n'
              '[model]\nnum_experts = 6\nhidden = 16\nffn_hidden = 24\n')
    host = switchyard.Runtime.from_string(config)
    device = switchyard.Runtime.from_string(
        config, overrides={"runtime.data_path": "pretend_cuda", "runtime.transport": transport})
    return host, device


@pytest.mark.parametrize("ranks", [1, 3])
def test_device_tensors_in_and_out_give_the_host_paths_bytes(ranks):
    host, device = runtimes(ranks)
    x = np.random.default_rng(4).standard_normal((29, 16)).astype(np.float32)
    expected = host.forward(x)
    # Device tokens in, a DeviceTensor out: the host path's bytes. The module names the
    # stream that reads the tokens, so that their producer orders its work before it.
    tokens = PretendCuda(x)
    y = device.forward(tokens)
    assert isinstance(tokens.stream, int) and tokens.stream not in (0, 1, 2)
    assert isinstance(y, switchyard.DeviceTensor) and y.shape == [29, 16]
    values, address = read_device_tensor(y)
    assert values.tobytes() == expected.tobytes()
    # Handed back without a copy: the runtime reads it where it is.
    assert switchyard._switchyard._data_pointer(y) == address
    # The chain's next layer takes it as its tokens.
    assert read_device_tensor(device.forward(y))[0].tobytes() == host.forward(expected).tobytes()
    # out= on the device, written in place.
    out = np.full((29, 16), np.nan, np.float32)
    target = PretendCuda(out)
    assert switchyard._switchyard._data_pointer(target) == out.ctypes.data
    assert device.forward(PretendCuda(x), out=target) is target
    assert out.tobytes() == expected.tobytes()
    # Host tokens on the device runtime: staged, the same bytes, a NumPy array back.
    assert device.forward(x).tobytes() == expected.tobytes()


def test_bad_device_input_is_refused_with_the_host_paths_messages():
    host, device = runtimes(2)
    x = np.random.default_rng(5).standard_normal((7, 16)).astype(np.float32)
    with pytest.raises(ValueError) as wrong_width:
        device.forward(PretendCuda(np.zeros((7, 17), np.float32)))
    assert "input x: expected f32[*,16]" in str(wrong_width.value)
    with pytest.raises(ValueError) as wrong_dtype:
        device.forward(PretendCuda(x.astype(np.float64)))
    assert "input x: expected f32[*,16]" in str(wrong_dtype.value)
    with pytest.raises(ValueError) as mixed:  # device tokens, a host output
        device.forward(PretendCuda(x), out=np.zeros((7, 16), np.float32))
    assert "output y: expected f32[7,16]" in str(mixed.value)
    with pytest.raises(ValueError) as on_host_runtime:  # no device behind a host data path
        host.forward(PretendCuda(x))
    assert "input x: expected f32[*,16]" in str(on_host_runtime.value)
    with pytest.raises(ValueError) as nan:  # the router refuses NaN logits on the device too
        device.forward(PretendCuda(np.full((7, 16), np.nan, np.float32)))
    assert "NaN" in str(nan.value)
    with pytest.raises(ValueError) as bad_plan:  # a dispatch's plan checked as on the host
        experts, weights = host.route(x)
        device.dispatch(PretendCuda(x), (np.full_like(experts, 9), weights))
    assert "has expert 9, outside 0..5" in str(bad_plan.value)
    assert device.forward(x).shape == (7, 16)  # and the runtime still works


@pytest.mark.parametrize("ranks,transport",
                         [(1, "inproc"), (3, "inproc"), (3, "pretend_device")])
def test_dispatch_and_combine_on_the_device_with_the_callers_experts(ranks, transport):
    """A framework's own experts between dispatch and combine: device tokens in, the parts'
    rows as DeviceTensors, the caller's results handed back as device tensors, y a
    DeviceTensor with the host path's bytes (inproc through host staging; pretend_device,
    stream-ordered, on the device)."""
    host, device = runtimes(ranks, transport)
    x = np.random.default_rng(8).standard_normal((31, 16)).astype(np.float32)
    plan = host.route(x)

    def experts_of(part, rows):
        # Expert e of the part: rows times (e + 1), then a tanh (its own arithmetic).
        out = np.empty_like(rows)
        first = 0
        for e, count in zip(part["experts"], part["rows_per_expert"]):
            out[first:first + count] = np.tanh(rows[first:first + count] * np.float32(e + 1))
            first += count
        return out

    on_host = host.dispatch(x, plan)
    expected = host.combine(on_host, [experts_of(p, p["expert_input"]) for p in on_host.parts])
    on_device = device.dispatch(PretendCuda(x), plan)
    outputs = []
    for part in on_device.parts:
        assert isinstance(part["expert_input"], switchyard.DeviceTensor)
        rows, _ = read_device_tensor(part["expert_input"])
        outputs.append(PretendCuda(experts_of(part, rows)))
    y = device.combine(on_device, outputs)
    assert isinstance(y, switchyard.DeviceTensor)
    assert read_device_tensor(y)[0].tobytes() == expected.tobytes()
    # The parts' own output buffers, written in place on the device, serve as well.
    again = device.dispatch(PretendCuda(x), plan)
    for part in again.parts:
        rows, _ = read_device_tensor(part["expert_input"])
        _, address = read_device_tensor(part["expert_output"])
        result = experts_of(part, rows)  # alive until the copy is made
        ctypes.memmove(address, result.ctypes.data, result.nbytes)
    assert read_device_tensor(device.combine(again))[0].tobytes() == expected.tobytes()


def test_token_ids_reach_a_hash_router_behind_device_tokens(tmp_path):
    # Device tokens go through the runtime's stream-ordered forward; the ids go with them
    # (and are forgotten after the call, as on the host path).
    table = np.array([[0, 1], [2, 3], [4, 5], [1, 4]], np.int32)
    np.save(tmp_path / "tid2eid.npy", table)
    extra = f'policy = "hash"\ntable = "{tmp_path / "tid2eid.npy"}"\n'
    config = (f'[runtime]\nranks = 2\nplugin_dirs = ["{FIXTURES}"]\n'
              '[experts]\nkernel = "pretend_swiglu"\n[router]\n' + extra +
              '[model]\nnum_experts = 6\nhidden = 16\nffn_hidden = 24\n')
    host = switchyard.Runtime.from_string(config)
    device = switchyard.Runtime.from_string(config,
                                            overrides={"runtime.data_path": "pretend_cuda"})
    x = np.random.default_rng(6).standard_normal((9, 16)).astype(np.float32)
    ids = np.array([0, 3, 2, 1, 1, 0, 2, 3, 0])
    expected = host.forward(x, token_ids=ids)
    y = device.forward(PretendCuda(x), token_ids=ids)
    assert read_device_tensor(y)[0].tobytes() == expected.tobytes()
    with pytest.raises(ValueError, match="no token ids were given"):
        device.forward(PretendCuda(x))


def test_worst_case_mode_through_python_same_bytes_and_its_errors_on_return():
    """[runtime] max_tokens_per_rank: device tokens give the counted host path's bytes; a rank
    over the limit fails the forward on every rank (its own error first); the next works."""
    host, _ = runtimes(3, "pretend_device")
    device = switchyard.Runtime.from_string(
        f'[runtime]\nranks = 3\nplugin_dirs = ["{FIXTURES}"]\nmax_tokens_per_rank = 10\n'
        '[experts]\nkernel = "pretend_swiglu"\n[router]\ntop_k = 2\n'
        '[model]\nnum_experts = 6\nhidden = 16\nffn_hidden = 24\n',
        overrides={"runtime.data_path": "pretend_cuda", "runtime.transport": "pretend_device"})
    x = np.random.default_rng(5).standard_normal((29, 16)).astype(np.float32)
    expected = host.forward(x)
    assert read_device_tensor(device.forward(PretendCuda(x)))[0].tobytes() == expected.tobytes()
    device.finish_worst_case_steps()  # nothing left to report
    too_many = np.random.default_rng(6).standard_normal((33, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="more than \\[runtime\\] max_tokens_per_rank = 10"):
        device.forward(PretendCuda(too_many))
    assert read_device_tensor(device.forward(PretendCuda(x)))[0].tobytes() == expected.tobytes()
