"""I2C front-end chips through smbus2: the TI BQ76952 cell monitor and the TI INA228 shunt
monitor, and the front-end that polls them on its own thread."""
