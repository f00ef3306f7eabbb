"""A process deletes its runtime and builds another, on every transport: three runtimes in
turn, either the old one deleted first or replaced by rebinding the name (so that it is
still alive while the next one is built), each forward the same bytes as the first.

Before, the first MPI runtime's deletion finalised MPI (the next runtime aborted the
process) and a second UCX runtime failed on both ranks ("address already in use", "two
processes claim RANK=1")."""
import os
import re
import subprocess
import sys
import tempfile

import pytest

TOOL = os.environ["SWITCHYARD_TOOL"]
MPIRUN = os.environ.get("SWITCHYARD_MPIRUN", "")

WORKER = r"""
import gc, hashlib, sys
import numpy as np
import switchyard
config, mode = sys.argv[1], sys.argv[2]
x = np.random.default_rng(3).standard_normal((12, 32)).astype(np.float32)
rt, digests = None, []
for round in range(3):
    if mode == "delete" and rt is not None:
        del rt
        gc.collect()
    rt = switchyard.Runtime(config)  # "rebind": the previous one lives until this returns
    digests.append(hashlib.sha256(rt.forward(x).tobytes()).hexdigest())
print("digests", " ".join(digests), flush=True)
"""

CONFIG = """
[runtime]
transport = "{transport}"
timeout_s = 30
{ranks}
[model]
hidden = 32
num_experts = 4
"""


def run(transport, mode, launcher):
    with tempfile.TemporaryDirectory() as d:
        worker = os.path.join(d, "worker.py")
        with open(worker, "w") as f:
            f.write(WORKER)
        config = os.path.join(d, "moe.toml")
        with open(config, "w") as f:
            f.write(CONFIG.format(transport=transport,
                                  ranks="ranks = 2" if transport == "inproc" else ""))
        done = subprocess.run(list(launcher) + [sys.executable, worker, config, mode],
                              capture_output=True, text=True, timeout=180,
                              env=dict(os.environ))
        assert done.returncode == 0, done.stdout + done.stderr
        # mpirun may interleave the two processes' lines: take the digests wherever they are.
        digests = re.findall(r"[0-9a-f]{64}", done.stdout)
        assert len(digests) == 3 * (1 if transport == "inproc" else 2), done.stdout
        assert len(set(digests)) == 1, done.stdout


@pytest.mark.parametrize("mode", ["delete", "rebind"])
def test_in_process(mode):
    run("inproc", mode, ())


@pytest.mark.skipif(not MPIRUN, reason="mpirun and the MPI/UCX transports were not built")
@pytest.mark.parametrize("mode", ["delete", "rebind"])
def test_mpi(mode):
    run("mpi", mode, (MPIRUN, "--allow-run-as-root", "--oversubscribe", "--mca", "btl",
                      "self,vader", "-np", "2"))


@pytest.mark.skipif(not MPIRUN, reason="mpirun and the MPI/UCX transports were not built")
@pytest.mark.parametrize("mode", ["delete", "rebind"])
def test_ucx(mode):
    run("ucx", mode, (TOOL, "launch", "-n", "2", "--"))
