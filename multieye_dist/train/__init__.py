"""The training layer: the loop and what it needs (setup, preflight, resume, outputs,
signals, the DeepSpeed engine, objectives, evaluation, the learning-rate schedule).
"""
