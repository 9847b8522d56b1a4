"""Orthogonality inside models: regularizers, orthogonal layers, compatible representations."""
