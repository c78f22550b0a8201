"""Training: data from the config's tasks, the sharded train state, the jitted steps, losses, optimizer,
pretrained-weight import and staged initialisation, Orbax checkpoints, metric writers."""
