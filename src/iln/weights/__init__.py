"""Weights on disk: trained runs' model files, the authors' released checkpoints, warm starts, and
the one place a run, a released entry or the baseline is opened."""
