"""State of health: throughput and ageing of the cells."""
