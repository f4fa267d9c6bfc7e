"""Tunnel workers: ICE (aioice), the Noise IK handshake, the AEAD codec, TAP devices,
per-link timers and counters, hosted in a small pool of processes (WorkerPool).
Knows nothing of XMPP: it talks to the agent over one local channel per process."""

from .messages import Event, LinkSpec, TurnServer
from .pool import PoolError, WorkerPool

__all__ = ["Event", "LinkSpec", "TurnServer", "PoolError", "WorkerPool"]
