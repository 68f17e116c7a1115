"""Protection: pure decisions from measurements and estimates (no I/O, no clock)."""
