"""The tracking layer: metrics, the run directory's records, W&B, pictures."""
