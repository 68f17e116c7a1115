"""Drivers for the instruments of a HIL rig, over SCPI on a TCP socket or a serial line."""
