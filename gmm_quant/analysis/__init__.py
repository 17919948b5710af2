"""Analyses of a trained model that train nothing: per-layer sensitivity."""
