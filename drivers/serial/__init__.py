"""Front-ends on a serial line (pyserial, imported only by the driver that uses it)."""
