"""multieye-dist: distributed OCT-CoDA (MultiEYE) training.

The library (models, losses, kernels, data, metrics) imports without deepspeed, submitit or the
W&B client.
"""

__version__ = "0.1.0"
