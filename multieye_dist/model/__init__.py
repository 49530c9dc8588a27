"""The model layer: the concept model, the concept bank, the losses and their kernels,
inference exports, explanations, importers of released weights, the oracle teachers.
"""
