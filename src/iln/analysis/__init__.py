"""Final-checkpoint analyses of a trained or released model."""
