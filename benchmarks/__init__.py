"""Benchmarks of the models and the data pipeline (not part of the installed package).

Run from the repository root: ``python -m benchmarks.suite`` (the suite),
``python -m benchmarks.vs_official CHECKOUT`` (a training step against the authors' HAT),
``benchmarks.fast_pieces``, ``benchmarks.grad_checkpoint`` and ``benchmarks.gpu``;
``benchmarks.timing`` holds the measuring they share (docs/benchmarks.md).
"""
