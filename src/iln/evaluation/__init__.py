"""Restoring images and scoring them: inference (whole image, tiles, self-ensemble), each task's
protocol, reduced precision, the monitor of a training run, and `iln restore` over a folder."""
