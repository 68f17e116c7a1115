"""The virtual rig: emulated SCPI instruments wired to the simulated pack (``python -m
hil.virtual``), so the rig tests run in CI against an unchanged ``bms run``."""
