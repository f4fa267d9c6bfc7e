"""ipop-switch: a user-level, self-configuring, peer-to-peer Layer-2 virtual network."""

__version__ = "0.1.0"
