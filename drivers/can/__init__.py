"""CAN backends: front-end, contactor box and status publisher over one shared python-can bus."""
