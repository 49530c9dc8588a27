"""The cluster layer: Slurm jobs through submitit, sweeps, the offline search, summaries."""
