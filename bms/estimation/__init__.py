"""State estimation: pure functions and small stateful wrappers, no I/O."""
