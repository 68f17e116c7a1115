"""The simulated pack: a plant model on the CAN bus, a first-class backend (``bms sim``)."""
