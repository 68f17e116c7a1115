"""GPIO backends: contactor relays on GPIO lines through libgpiod v2 (the ``gpiod`` package)."""
