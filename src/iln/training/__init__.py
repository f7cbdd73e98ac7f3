"""The training loop and what it needs: resume, the fingerprint a checkpoint must match, the KL
regulariser, processes."""
