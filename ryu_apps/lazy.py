"""Deferred imports for the switch app's process (memory: issue 21 item 4).

os-ken imports, at start-up, the parsers of every OpenFlow version (1.0 to 1.5) and its whole
packet library (every protocol down to BGP and Zebra, for ``PKT_CLS_DICT``). This app speaks
OpenFlow 1.3 only and parses frames itself (packets.py), so those modules cost ~12 MB of a
~52 MB process and are never used. ``install()``, called by launch.py before os-ken is
imported, defers them:

- the other versions' parsers become *hidden* stand-ins: ``dir()`` lists nothing, so os-ken's
  start-up scan (ofp_event, one event class per message class) passes them by; any real
  attribute loads the true module (a 1.0 switch would still be parsed, at that cost);
- the packet protocol modules load lazily (``importlib.util.LazyLoader``): at first use;
- ``os_ken.lib.packet.packet`` is hidden with a stand-in ``Packet`` class: the 1.3 parser uses
  it only in ``isinstance(data, packet.Packet)`` when sending a PacketOut, and this app sends
  bytes, never os-ken Packet objects. Anything else of that module loads the true one.

Semantics are unchanged except for that one class (and the event classes of messages that
exist only in other OpenFlow versions, which the app never receives). In the agent and in
tests that import the app directly nothing of this is installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

OTHER_PARSERS = tuple(f"os_ken.ofproto.ofproto_v1_{v}_parser" for v in "0245")
PACKET_MODULES = tuple(f"os_ken.lib.packet.{n}" for n in
                       ("ethernet", "arp", "icmp", "icmpv6", "ipv4", "ipv6", "lldp", "mpls"))
PACKET = "os_ken.lib.packet.packet"


class Hidden(types.ModuleType):
    """A module stand-in that lists nothing and loads the true module at the first real
    attribute asked for (dunder look-ups by the import machinery do not count)."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(load_real(self.__name__), attr)


def load_real(name: str) -> types.ModuleType:
    """The true module ``name``, executed now if only a stand-in was there."""
    mod = sys.modules.get(name)
    if mod is not None and not isinstance(mod, Hidden):
        return mod
    parent = name.rpartition(".")[0]
    spec = importlib.machinery.PathFinder.find_spec(name, sys.modules[parent].__path__ if parent else None)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}", name=name)
    real = importlib.util.module_from_spec(spec)
    sys.modules[name] = real
    spec.loader.exec_module(real)
    return real


class _NotOsKenPacket:
    """Stand-in for os_ken's Packet: nothing this app sends is one."""


class Deferring(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Meta-path finder: ``hidden`` names get a Hidden stand-in, ``lazy`` ones a LazyLoader."""

    def __init__(self, *, hidden: tuple[str, ...] = (), lazy: tuple[str, ...] = ()) -> None:
        self.hidden, self.lazy = frozenset(hidden), frozenset(lazy)

    def find_spec(self, name, path, target=None):
        if name in self.hidden:
            return importlib.machinery.ModuleSpec(name, self)
        if name in self.lazy:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.loader is not None:
                spec.loader = importlib.util.LazyLoader(spec.loader)
            return spec
        return None

    def create_module(self, spec):
        mod = Hidden(spec.name)
        if spec.name == PACKET:
            mod.Packet = _NotOsKenPacket
        return mod

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    """Defer what the app never uses; call before anything imports os_ken."""
    if any(isinstance(f, Deferring) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, Deferring(hidden=(*OTHER_PARSERS, PACKET), lazy=PACKET_MODULES))
