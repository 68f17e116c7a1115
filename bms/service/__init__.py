"""Running as a service: systemd notification and watchdog, the journal, real-time set-up and
the control socket that ``bms status`` and ``bms faults`` talk to."""
