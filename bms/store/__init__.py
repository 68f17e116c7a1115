"""Persistence: what must survive a restart."""
