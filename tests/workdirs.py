"""A run directory as the trainer leaves it, without training: config.json + checkpoints/<step>/state
with random leaves in the trainer's state layout (compiling the real initialiser costs ~50 s on 2 cores).
For tests that check plumbing and input handling, not quality."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from pixelground.config.parse import load_config
from pixelground.parallel import sharding
from pixelground.training import train_state


def random_workdir(config_file: str, root, step: int):
  """Writes `root`/config.json (of `config_file`, "file.py[:arg]") and a random checkpoint at `step`."""
  import orbax.checkpoint as ocp

  config = load_config(config_file)
  with open(os.path.join(root, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  setup = train_state.build_setup(config, mesh)
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda a: (rng.normal(0, 0.05, a.shape) if jnp.issubdtype(a.dtype, jnp.floating)
                                  else np.zeros(a.shape)).astype(a.dtype), setup.abstract_state)
  mgr = ocp.CheckpointManager(os.path.join(root, "checkpoints"),
                              item_handlers={"state": ocp.StandardCheckpointHandler()})
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  mgr.wait_until_finished()
  mgr.close()
  return root
