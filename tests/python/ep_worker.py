"""One rank of a multi-process job driven from Python (run by test_switchyard.py under
mpirun and `switchyard launch`): the layer on this rank's own tokens, dispatch/combine with
the test's experts, and a training forward and backward, each rank's results written to
OUT/<what>_<rank>.npy.

    mpirun -np 2 python3 ep_worker.py CONFIG TRANSPORT 2 OUT
"""
import os
import sys

import numpy as np

import switchyard

config, transport, ranks, out = sys.argv[1:5]
rt = switchyard.Runtime(config, overrides={"runtime.transport": transport, "runtime.ranks": ranks,
                                           "runtime.timeout_s": "60"})
assert len(rt.ranks) == 1, "one rank per process"
rank, world = rt.ranks[0], rt.world_size
# The job's tokens are the test's; this rank owns its block of them (as token_block splits).
x_all = np.random.default_rng(11).standard_normal((41, rt.hidden)).astype(np.float32)
base, extra = divmod(len(x_all), world)
first = rank * base + min(rank, extra)
x = np.ascontiguousarray(x_all[first:first + base + (rank < extra)])

y = rt.forward(x)
np.save(os.path.join(out, f"forward_{rank}.npy"), y)

experts, weights = rt.route(x)
dispatched = rt.dispatch(x, (experts, weights))
assert len(dispatched.parts) == 1
part = dispatched.parts[0]
rows = 0
for e, n in zip(part["experts"], part["rows_per_expert"]):  # the test's experts: (e + 1) v
    part["expert_output"][rows:rows + n] = (e + 1) * part["expert_input"][rows:rows + n]
    rows += n
combined = rt.combine(dispatched)
np.save(os.path.join(out, f"combined_{rank}.npy"), combined)
np.save(os.path.join(out, f"routing_{rank}.npy"), np.concatenate([experts, weights.view(np.int32)], 1))

# Training: the backward of a training forward on the same tokens, with the test's dy.
dy_all = np.random.default_rng(12).standard_normal(x_all.shape).astype(np.float32)
rt.training = True
rt.forward(x)
dx, d_gate, d_experts = rt.backward(x, np.ascontiguousarray(dy_all[first:first + len(x)]))
np.save(os.path.join(out, f"dx_{rank}.npy"), dx)
np.save(os.path.join(out, f"d_gate_{rank}.npy"), d_gate)
held = [(e, g) for e, g in enumerate(d_experts) if g is not None]
np.save(os.path.join(out, f"held_{rank}.npy"), np.array([e for e, _ in held], np.int64))
np.save(os.path.join(out, f"d_experts_{rank}.npy"),
        np.concatenate([w.ravel() for _, g in held for w in g]))
