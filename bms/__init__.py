"""pybms: battery-management runtime. See DESIGN.md for the cycle and the conventions."""
