"""Communication: the DBC codec shared by every CAN backend and the simulated pack."""
