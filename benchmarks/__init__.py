"""Benchmarks of the models and the data pipeline (not part of the installed package).

Run from the repository root: ``python -m benchmarks.suite`` (the suite) and
``python -m benchmarks.vs_official CHECKOUT`` (a training step against the authors' HAT).
"""
