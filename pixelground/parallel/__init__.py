"""Parallelism: the device mesh and logical-axis sharding rules, multi-host process start-up."""
