"""examples/model (a small MoE transformer trained EP + DP) in a shortened run: the one-process
pure-PyTorch reference, 4 in-process ranks, 4 processes EP 2 x DP 2 under mpirun (MPI) and
EP 4 x DP 1 under `switchyard launch` (UCX) give the reference's loss at every step (1e-4
relative) and its trained weights (1e-4: per tensor, the norm of the difference over the
norm); the loss falls; `switchyard run`
loads the saved checkpoint's MoE layers, and the script itself starts from it again.

usage: model_example.py BIN_DIR SOURCE_DIR WORK_DIR MPIRUN [MPIRUN_FLAGS...]"""
import json
import os
import subprocess
import sys

import numpy as np

BIN, SOURCE, WORK, MPIRUN = sys.argv[1:5]
MPIRUN_FLAGS = sys.argv[5:]
SCRIPT = os.path.join(SOURCE, "examples", "model", "train_moe_transformer.py")
STEPS = 12
sys.path.insert(0, os.path.dirname(SCRIPT))
import train_moe_transformer as example  # noqa: E402

os.makedirs(WORK, exist_ok=True)
env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(BIN), "python"))
python = "/usr/bin/python3"


def run(name, command):
    out = os.path.join(WORK, name)
    command = command + ["--steps", str(STEPS), "--json", out + ".json", "--save",
                         out + ".safetensors"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stdout}\n{done.stderr}")
    with open(out + ".json") as f:
        return json.load(f), example.load_safetensors(out + ".safetensors")


reference, reference_weights = run("reference", [python, SCRIPT])
runs = {
    "inproc 4 ranks": run("inproc", [python, SCRIPT, "--ranks", "4"]),
    "mpirun EP 2 x DP 2": run("mpi", [MPIRUN, *MPIRUN_FLAGS, "-np", "4", "-x", "PYTHONPATH",
                                      "-x", "MASTER_ADDR=127.0.0.1", "-x", "MASTER_PORT=29741",
                                      python, SCRIPT, "--ep-size", "2", "--transport", "mpi"]),
    "launch EP 4 x DP 1": run("ucx", [os.path.join(BIN, "switchyard"), "launch", "-n", "4", "--",
                                      python, SCRIPT, "--ep-size", "4"]),
}
failures = []
losses = np.array(reference["loss"])
if not losses[-1] < losses[0]:
    failures.append(f"the reference's loss did not fall: {losses[0]} -> {losses[-1]}")
for name, (figures, weights) in runs.items():
    worst_loss = float(np.max(np.abs(np.array(figures["loss"]) - losses) / np.abs(losses)))
    # Per tensor: the norm of the difference over the reference's norm (Adam turns
    # rounding-level gradient differences of near-zero gradients into element differences
    # of ~1e-4 of the largest weight, printed as well).
    worst_weight = max(float((weights[k] - w).norm() / w.norm()) for k, w in reference_weights.items())
    worst_element = max(float((weights[k] - w).abs().max() / w.abs().max())
                        for k, w in reference_weights.items())
    print(f"{name}: loss within {worst_loss:.2e} relative at every step, weights within "
          f"{worst_weight:.2e} (norm of the difference / norm; largest element difference "
          f"{worst_element:.2e} of the largest weight)")
    if worst_loss > 1e-4 or worst_weight > 1e-4 or sorted(weights) != sorted(reference_weights):
        failures.append(name)

# `switchyard run` reads the MoE layers of the checkpoint (Mixtral names) and checks them
# against its dense reference; the script starts from the checkpoint again.
with open(os.path.join(WORK, "model.toml"), "w") as f:
    f.write('[model]\nweights = "reference.safetensors"\nformat = "mixtral"\n'
            'prefix = "model.layers.{layer}.block_sparse_moe."\nlayers = "0-3"\n'
            "[router]\ntop_k = 2\npre_softmax = true\nnormalize = true\n"
            "[input]\nnum_tokens = 32\n[runtime]\nranks = 2\n")
done = subprocess.run([os.path.join(BIN, "switchyard"), "run", os.path.join(WORK, "model.toml"),
                       "--check"], env=env, capture_output=True, text=True, timeout=120)
print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr)
if done.returncode != 0:
    failures.append("switchyard run on the checkpoint: " + done.stderr)
again, _ = run("again", [python, SCRIPT, "--load", os.path.join(WORK, "reference.safetensors")])
if not again["loss"][0] < losses[0]:
    failures.append("starting from the checkpoint did not start from the trained loss")
if failures:
    sys.exit("FAILED: " + "; ".join(failures))
print(f"the reference's loss {losses[0]:.4f} -> {losses[-1]:.4f} in {STEPS} steps; "
      f"from the checkpoint {again['loss'][0]:.4f}")
