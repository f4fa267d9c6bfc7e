"""What a lab looks like: sites, their NAT kinds and options; from flags or a small TOML file."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IpopError

# Tailscale natlab's names: none = public host, one2one = static 1:1 NAT,
# easy = endpoint-independent mapping + address-and-port-dependent filtering
# (Linux masquerade), hard = endpoint-dependent mapping (random ports).
NAT_KINDS = ("none", "one2one", "easy", "hard")
# Underlay families of a site: IPv4 only (NATed as ``nat`` says), dual-stack (IPv4 as
# ``nat`` says, IPv6 routed), IPv6 only (no IPv4 outside the host). IPv6 is never NATed:
# a NATed site's router forwards it behind a stateful firewall that filters like ``easy``.
IP_KINDS = ("v4", "dual", "v6")
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")


class LabSpecError(IpopError):
    pass


@dataclass(frozen=True)
class SiteSpec:
    name: str
    nat: str = "easy"
    hosts: int = 1
    hairpin: bool = False
    cgnat: bool = False          # a second (carrier-grade, easy) NAT in front of the site's router
    loss: float = 0.0            # percent of packets dropped each way at the site's edge
    udp_blocked: bool = False    # no UDP leaves or enters the site (TURN over TCP only)
    ip: str = "v4"               # underlay family: v4 | dual | v6 (IP_KINDS)

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise LabSpecError(f"site name {self.name!r}: use 1-10 lowercase letters/digits, starting with a letter")
        if self.nat not in NAT_KINDS:
            raise LabSpecError(f"site {self.name}: nat {self.nat!r} is not one of {', '.join(NAT_KINDS)}")
        if not 1 <= self.hosts <= 50:
            raise LabSpecError(f"site {self.name}: hosts must be 1..50, not {self.hosts}")
        if not 0.0 <= self.loss <= 100.0:
            raise LabSpecError(f"site {self.name}: loss must be a percentage 0..100, not {self.loss}")
        if self.nat == "none" and (self.hairpin or self.cgnat):
            raise LabSpecError(f"site {self.name}: hairpin and cgnat need a NAT (nat is none)")
        if self.ip not in IP_KINDS:
            raise LabSpecError(f"site {self.name}: ip {self.ip!r} is not one of {', '.join(IP_KINDS)}")
        if self.ip != "v4" and self.cgnat:
            raise LabSpecError(f"site {self.name}: cgnat is IPv4 only (IPv6 is routed): use ip = \"v4\"")

    @property
    def has_v4(self) -> bool:
        return self.ip != "v6"

    @property
    def has_v6(self) -> bool:
        return self.ip != "v4"

    def host_names(self) -> list[str]:
        return [f"{self.name}h{j}" for j in range(1, self.hosts + 1)]


@dataclass(frozen=True)
class LabSpec:
    name: str = "lab"
    sites: tuple[SiteSpec, ...] = field(default_factory=tuple)
    accounts: tuple[str, ...] = ()   # extra XMPP accounts beyond one per host

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise LabSpecError(f"lab name {self.name!r}: use 1-10 lowercase letters/digits, starting with a letter")
        if not self.sites:
            raise LabSpecError("a lab needs at least one site")
        if len(self.sites) > 200:
            raise LabSpecError("at most 200 sites")
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise LabSpecError(f"site names repeat: {names}")
        if "core" in names:
            raise LabSpecError("'core' is reserved for the services namespace")

    @property
    def has_v6(self) -> bool:
        """Some site has IPv6: the core then carries IPv6 too (its services listen on both)."""
        return any(s.has_v6 for s in self.sites)

    @classmethod
    def from_flags(
        cls,
        *,
        name: str = "lab",
        sites: int = 3,
        nat: str = "none,easy,hard",
        hosts: int = 1,
        hairpin: bool = False,
        cgnat: bool = False,
        loss: float = 0.0,
        udp_blocked: bool = False,
        ip: str = "v4",
    ) -> "LabSpec":
        """``nat`` and ``ip`` are comma lists, one per site (the last repeats if there are fewer)."""
        kinds = [k.strip() for k in nat.split(",") if k.strip()] or ["easy"]
        fams = [k.strip() for k in ip.split(",") if k.strip()] or ["v4"]
        out = []
        for i in range(sites):
            kind = kinds[min(i, len(kinds) - 1)]
            fam = fams[min(i, len(fams) - 1)]
            out.append(
                SiteSpec(
                    name=f"s{i + 1}", nat=kind, hosts=hosts,
                    hairpin=hairpin and kind != "none", cgnat=cgnat and kind != "none",
                    loss=loss, udp_blocked=udp_blocked, ip=fam,
                )
            )
        return cls(name=name, sites=tuple(out))

    @classmethod
    def from_toml(cls, path: Path, *, name: str | None = None) -> "LabSpec":
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise LabSpecError(f"{path}: no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise LabSpecError(f"{path}: {e}") from None
        return cls.from_dict(data, name=name, where=str(path))

    @classmethod
    def from_dict(cls, data: dict, *, name: str | None = None, where: str = "lab config") -> "LabSpec":
        allowed = {"name", "site", "accounts"}
        unknown = set(data) - allowed
        if unknown:
            raise LabSpecError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        sites = []
        for i, s in enumerate(data.get("site", [])):
            if not isinstance(s, dict):
                raise LabSpecError(f"{where}: site[{i}] must be a table")
            fields = set(SiteSpec.__dataclass_fields__)
            bad = set(s) - fields
            if bad:
                raise LabSpecError(f"{where}: site[{i}]: unknown key(s) {sorted(bad)}; allowed: {sorted(fields)}")
            s = {"name": f"s{i + 1}", **s}
            for key, typ in (("hosts", int), ("loss", (int, float)), ("hairpin", bool), ("cgnat", bool), ("udp_blocked", bool), ("nat", str), ("name", str), ("ip", str)):
                if key in s and (not isinstance(s[key], typ) or (typ is int and isinstance(s[key], bool))):
                    raise LabSpecError(f"{where}: site[{i}].{key}: wrong type {type(s[key]).__name__}")
            sites.append(SiteSpec(**s))
        accounts = data.get("accounts", [])
        if not isinstance(accounts, list) or not all(isinstance(a, str) and NAME_RE.match(a) for a in accounts):
            raise LabSpecError(f"{where}: accounts must be a list of lowercase names")
        return cls(name=name or data.get("name", "lab"), sites=tuple(sites), accounts=tuple(accounts))
