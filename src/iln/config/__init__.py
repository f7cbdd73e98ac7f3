"""Params: the typed schema of params.yaml, config overlays, and where every artefact lives."""
