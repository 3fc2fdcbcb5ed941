"""The AND method: the sharded memory bank, the loss, neighbourhood discovery and the curriculum."""
