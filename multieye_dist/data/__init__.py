"""Data: the MultiEYE layout, synthetic data, WebDataset shards."""
