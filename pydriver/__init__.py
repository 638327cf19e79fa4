"""pybridge: a Docker remote network driver and IPAM driver for Linux bridges."""

__version__ = "0.1.0"
