"""The lowest layer: atomic writes, config sections, resources and the one rule for
user paths, the run lock, the distributed environment.
"""
