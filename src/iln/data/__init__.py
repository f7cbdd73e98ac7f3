"""Data layer: dataset catalogue and download, image IO, degradations, training/test datasets."""
