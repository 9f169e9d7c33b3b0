"""Turning a Llama into a SwiftKV Llama: training data, K/V initialisation, the distillation
trainer, evaluation against the teacher, and plots of a run."""
