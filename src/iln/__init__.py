"""iln: reproduce "Analyzing the Training Dynamics of Image Restoration Transformers:
A Revisit to Layer Normalization" (arXiv 2504.06629) as a DVC + MLflow pipeline."""

__version__ = "0.1.0"
