"""Named network namespaces and veth pairs, all under one prefix so they can be found again.

Both ends of a veth are created directly inside their namespaces: nothing ever
appears in the root namespace, and interface names need only be unique per namespace.
"""

from __future__ import annotations

from .. import proc

NS_PREFIX = "ipsw-"


def ns_name(lab: str, what: str) -> str:
    return f"{NS_PREFIX}{lab}-{what}"


def list_namespaces() -> list[str]:
    out = proc.run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def ip(ns: str, *args: str) -> None:
    proc.run(["ip", "-n", ns, *args])


def sysctl(ns: str, key: str, value: str) -> None:
    proc.run(["sysctl", "-q", "-w", f"{key}={value}"], netns=ns)


class Namespaces:
    """The namespaces of one lab (or one test); ``destroy_lab(name)`` removes them all."""

    def __init__(self, lab: str, on_add=None) -> None:
        self.lab = lab
        self.names: list[str] = []
        self._on_add = on_add

    def add(self, what: str) -> str:
        ns = ns_name(self.lab, what)
        proc.run(["ip", "netns", "add", ns])
        self.names.append(ns)
        if self._on_add:
            self._on_add(ns)
        ip(ns, "link", "set", "lo", "up")
        return ns

    @staticmethod
    def veth(ns_a: str, if_a: str, ns_b: str, if_b: str, *, up: bool = True, mtu: int | None = None) -> None:
        proc.run(["ip", "link", "add", "name", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b])
        for ns, dev in ((ns_a, if_a), (ns_b, if_b)):
            if mtu:
                ip(ns, "link", "set", dev, "mtu", str(mtu))
            if up:
                ip(ns, "link", "set", dev, "up")
