"""Concrete backends: each imports its hardware library lazily, inside the backend."""
