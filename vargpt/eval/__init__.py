"""Benchmark scorers used by ``evaluate.py`` and by in-training evaluation callbacks.

Scorers take images or predictions, never a model: generation plugs in through the small protocols in
``vargpt.eval.protocols`` (``ImageGenerator``, ``ChatModel``), which the unified model satisfies.
Heavy dependencies (transformers, torch-fidelity) are imported by the modules that need them, not here.
"""
