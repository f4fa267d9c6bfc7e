"""Build, inspect and tear down a lab: namespaces, veths, NAT routers, services.

Layout (site i, host j):
- ``ipsw-<lab>-core``: a Linux bridge ``pub`` on 198.18.0.0/15 holding the XMPP
  server (198.18.0.1), STUN/TURN (198.18.0.2) and a second STUN address (198.18.0.3);
- public host (nat none): ``ipsw-<lab>-<site>h<j>`` on the core bridge, 198.18.i.(10+j);
- NATed site: router ``ipsw-<lab>-<site>r`` (WAN 198.18.i.1, LAN 100.64.i.1/24)
  and hosts on 100.64.i.(10+j); with CGNAT a carrier NAT ``ipsw-<lab>-<site>c``
  (WAN 198.18.i.1) in front, the router's WAN then on 100.100.i.2/24.
With IPv6 (a site's ``ip`` dual or v6) every part above also gets ULA addresses, routed,
not translated (``ipv6.py``); a v6 site has no IPv4 outside its hosts' loopback.
The root namespace gets no interface and no route into any of it. Everything the
lab makes is named with its prefix and listed in ``state.json``, so ``down``
finds it again after a crash.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import proc
from ..errors import IpopError
from ..progress import stage
from . import ipv6, nat, services
from .netns import NS_PREFIX, Namespaces, ip as _ip, list_namespaces, ns_name, sysctl as _sysctl
from .spec import LabSpec, SiteSpec

STATE_ROOT = Path(os.environ.get("IPSW_LAB_STATE", "/run/ipop-switch/lab"))
PUBLIC_PREFIX = 15           # 198.18.0.0/15, one L2 segment on the core bridge
TURN_USER = "lab"


class LabError(IpopError):
    pass


@dataclass
class HostInfo:
    name: str
    site: str
    nat: str
    netns: str
    lan_ip: str
    public_ip: str
    gateway: str | None
    xmpp_user: str
    xmpp_password: str
    ip: str = "v4"                 # the site's underlay family: v4 | dual | v6
    ip6: str | None = None         # the host's IPv6 address (routed: its LAN and public one)


class Lab:
    """A running (or to-be-built) lab. ``with Lab(spec) as lab:`` builds and always tears down."""

    def __init__(self, spec: LabSpec, *, state_root: Path = STATE_ROOT, tied: bool = True,
                 xmpp: str = "prosody", xmpp_nodes: int = 1) -> None:
        """``tied``: the lab's daemons end with the thread that built the lab (a test run, the demo,
        a bench), even on kill -9; ``lab up`` builds an untied lab that stays until ``lab down``.
        ``xmpp``: the signaling server, ``prosody`` (one) or ``ejabberd`` (a cluster of
        ``xmpp_nodes`` nodes, lab/ejabberd.py)."""
        if xmpp not in ("prosody", "ejabberd") or not 1 <= xmpp_nodes <= 4 or (xmpp == "prosody" and xmpp_nodes != 1):
            raise LabError(f"xmpp {xmpp!r} with {xmpp_nodes} node(s): use prosody (1 node) or ejabberd (1-4 nodes)")
        self.xmpp, self.xmpp_nodes = xmpp, xmpp_nodes
        self.spec = spec
        self.tied = tied
        self.owner = os.getpid() if tied else None   # whose end ends a tied lab's daemons
        self.dir = Path(state_root) / spec.name
        self.hosts: dict[str, HostInfo] = {}
        self.pids: dict[str, int] = {}
        self._ns = Namespaces(spec.name, on_add=lambda ns: self._save())
        self.namespaces = self._ns.names
        self.turn_password = ""
        self._children: list[subprocess.Popen[bytes]] = []

    # -- public API ---------------------------------------------------------
    @property
    def core_ns(self) -> str:
        return ns_name(self.spec.name, "core")

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca" / "ca.crt"

    def host(self, name: str) -> HostInfo:
        try:
            return self.hosts[name]
        except KeyError:
            raise LabError(f"no host {name!r} in lab {self.spec.name}; hosts: {', '.join(self.hosts)}") from None

    @property
    def xmpp_addrs(self) -> tuple[str, ...]:
        """The XMPP servers' addresses (one per ejabberd node; the first is Prosody's too)."""
        from .ejabberd import xmpp_addrs
        return xmpp_addrs(self.xmpp_nodes)

    def services(self) -> dict[str, dict]:
        return {
            "xmpp": {"address": services.XMPP_ADDR, "port": services.XMPP_PORT, "domain": services.XMPP_DOMAIN,
                     "muc": services.MUC_DOMAIN, "ca": str(self.ca_cert),
                     "pid": self.pids.get("prosody") or self.pids.get("ejabberd1"),
                     "address6": ipv6.XMPP_ADDR6 if self.spec.has_v6 else None,
                     "kind": self.xmpp, "addresses": list(self.xmpp_addrs)},
            "turn": {"address": services.TURN_ADDR, "port": services.TURN_PORT, "stun2": services.STUN_ADDR2,
                     "user": TURN_USER, "password": self.turn_password, "pid": self.pids.get("coturn"),
                     "address6": ipv6.TURN_ADDR6 if self.spec.has_v6 else None},
        }

    def up(self) -> "Lab":
        proc.require_root()
        xmpp_bin = ("prosody", "prosody") if self.xmpp == "prosody" else ("erl", "ejabberd")
        for b, pkg in (("ip", "iproute2"), ("nft", "nftables"), xmpp_bin, ("turnserver", "coturn")):
            proc.require(b, pkg)
        if (self.dir / "state.json").exists() or any(n.startswith(ns_name(self.spec.name, "")) for n in list_namespaces()):
            raise LabError(f"lab {self.spec.name} already exists: run 'ipop-switch lab down --name {self.spec.name}' first")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._save()  # so that a crash half-way is still cleaned up by down
        try:
            stage("core router")
            self._build_core()
            for i, site in enumerate(self.spec.sites, start=1):
                stage(f"site {i}/{len(self.spec.sites)} {site.name} ({site.nat})")
                self._build_site(i, site)
            self._start_services()
            self._save()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        for p in self._children:
            proc.terminate(p.pid)
        self._children.clear()
        destroy_lab(self.spec.name, state_root=self.dir.parent)

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def exec(self, host: str, argv: list[str], *, check: bool = True, timeout: float = 60.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in a host's (or 'core', or a router's) namespace."""
        return proc.run(argv, netns=self.netns_of(host), check=check, timeout=timeout, input=input)

    def popen(self, host: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start a command in a namespace; the lab kills it on down (it runs in the lab's namespace)."""
        return subprocess.Popen(proc.netns_prefix(self.netns_of(host)) + list(argv), **kw)

    def netns_of(self, name: str) -> str:
        if name in self.hosts:
            return self.hosts[name].netns
        ns = ns_name(self.spec.name, name)
        if ns in self.namespaces:
            return ns
        raise LabError(f"no host or namespace {name!r} in lab {self.spec.name}; hosts: {', '.join(self.hosts)}")

    def add_namespace(self, what: str) -> str:
        """A further namespace of the lab (a guest container of a host, say), removed with the lab."""
        return self._ns.add(what)

    def add_account(self, user: str) -> str:
        """Register one more XMPP account (Prosody reads accounts from disk on login)."""
        pw = services.new_password()
        if self.xmpp == "ejabberd":
            self._ejabberd().register([(user, pw)])
        else:
            services.Prosody(self.dir / "prosody", self.core_ns, self.dir / "ca").register(user, pw)
        return pw

    # -- loading ------------------------------------------------------------
    @classmethod
    def load(cls, name: str, *, state_root: Path = STATE_ROOT) -> "Lab":
        path = Path(state_root) / name / "state.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab named {name!r} is up (no {path})") from None
        spec = LabSpec.from_dict({"site": data["spec"]["sites"], "accounts": list(data["spec"]["accounts"])}, name=name)
        lab = cls(spec, state_root=state_root, xmpp=data.get("xmpp", "prosody"), xmpp_nodes=data.get("xmpp_nodes", 1))
        lab.hosts = {h["name"]: HostInfo(**h) for h in data["hosts"]}
        lab.pids = data["pids"]
        lab._ns.names[:] = data["namespaces"]
        lab.turn_password = data["turn_password"]
        lab.tied, lab.owner = bool(data.get("tied")), data.get("owner")
        return lab

    def _save(self) -> None:
        data = {
            "spec": {"sites": [asdict(s) for s in self.spec.sites], "accounts": list(self.spec.accounts)},
            "hosts": [asdict(h) for h in self.hosts.values()],
            "pids": self.pids,
            "namespaces": self.namespaces,
            "turn_password": self.turn_password,
            "xmpp": self.xmpp, "xmpp_nodes": self.xmpp_nodes,
            "created": time.time(),
            "tied": self.tied,
            "owner": self.owner,
        }
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        tmp.chmod(0o600)
        tmp.replace(self.dir / "state.json")

    # -- building -------------------------------------------------------------
    def _add_ns(self, what: str) -> str:
        return self._ns.add(what)

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        self._ns.veth(ns_a, if_a, ns_b, if_b, up=False)

    def _uplink(self, ns: str, dev: str, core_if: str) -> None:
        """Connect ``ns`` (interface ``dev``) to the core bridge through ``core_if``."""
        self._veth(ns, dev, self.core_ns, core_if)
        _ip(self.core_ns, "link", "set", core_if, "master", "pub", "up")
        _ip(ns, "link", "set", dev, "up")

    @property
    def _lossy(self) -> bool:
        """A lab with loss anywhere segments every host's UDP bursts at its uplink, so that
        whatever reaches a lossy site's rule (in the core or at its router) is single datagrams."""
        return any(s.loss > 0 for s in self.spec.sites)

    def _udp_gso_off(self, ns: str, dev: str) -> None:
        """Segment UDP GSO bursts when ``dev`` transmits. A burst (one ``sendmsg`` with
        UDP_SEGMENT) otherwise crosses the lab's veths, bridge and routers as one skb, so the
        nftables ``numgen`` loss of a lossy site drops whole bursts (up to 64 datagrams) where a
        real wire loses single packets. Hooks in the sender's own namespace (the host's
        OUTPUT/POSTROUTING) still run before this segmentation and see the burst."""
        proc.run(["ethtool", "-K", dev, "tx-udp-segmentation", "off"], netns=ns)

    def _gro_into_host(self, tx_ns: str, tx_dev: str, host_ns: str) -> None:
        """Let the lossy host's ``eth0`` aggregate what it receives (GRO), as a real NIC does
        after a lossy path: a socket with UDP_GRO then reads runs of datagrams at once. A veth
        aggregates only with GRO on and only what its peer (``tx_dev``) sends without TSO;
        loss is applied before this hop, on single datagrams. As on a real NIC, a lost datagram
        (a gap in the IP ids) ends an aggregate."""
        proc.run(["ethtool", "-K", tx_dev, "tso", "off"], netns=tx_ns)
        proc.run(["ethtool", "-K", "eth0", "gro", "on"], netns=host_ns)

    def _build_core(self) -> None:
        core = self._add_ns("core")
        _ip(core, "link", "add", "pub", "type", "bridge")
        _ip(core, "link", "set", "pub", "up")
        for a in (*self.xmpp_addrs, services.TURN_ADDR, services.STUN_ADDR2):
            _ip(core, "addr", "add", f"{a}/{PUBLIC_PREFIX}", "dev", "pub")
        if self.spec.has_v6:            # the core routes IPv6 to the sites' prefixes
            _sysctl(core, "net.ipv6.conf.all.forwarding", "1")
            _no_mcast_snooping(core, "pub")
            for a in (ipv6.XMPP_ADDR6, ipv6.TURN_ADDR6, ipv6.STUN_ADDR6_2, ipv6.CORE_GW):
                _addr6(core, "pub", a)

    def _build_site(self, i: int, site: SiteSpec) -> None:
        if site.nat == "none":
            for j, hname in enumerate(site.host_names(), start=1):
                ns = self._add_ns(hname)
                pub = f"198.18.{i}.{10 + j}"
                self._uplink(ns, "eth0", f"s{i}h{j}")
                if site.has_v4:
                    _ip(ns, "addr", "add", f"{pub}/{PUBLIC_PREFIX}", "dev", "eth0")
                ip6 = ipv6.public_host(i, j) if site.has_v6 else None
                if ip6:
                    _addr6(ns, "eth0", ip6)
                    _ip(ns, "-6", "route", "add", "default", "via", ipv6.CORE_GW)
                    pub = pub if site.has_v4 else ip6
                if self._lossy:         # bursts reach the core as single datagrams
                    self._udp_gso_off(ns, "eth0")
                if site.loss > 0:       # per-datagram loss both ways at the core's port, then GRO
                    self._udp_gso_off(self.core_ns, f"s{i}h{j}")
                    self._gro_into_host(self.core_ns, f"s{i}h{j}", ns)
                rules = nat.host_edge_ruleset("eth0", udp_blocked=site.udp_blocked)
                if rules:
                    proc.run(["nft", "-f", "-"], netns=ns, input=rules)
                if site.loss > 0:
                    proc.run(["nft", "-f", "-"], netns=self.core_ns,
                             input=nat.core_port_loss_ruleset(f"s{i}h{j}", site.loss))
                self._add_host(hname, site, ns, pub, pub, None, ip6)
            return
        wan_ip = f"198.18.{i}.1"
        router = self._add_ns(f"{site.name}r")
        _sysctl(router, "net.ipv4.ip_forward", "1")
        if not site.has_v4:
            self._build_v6_site(i, site, router)
            return
        if site.cgnat:
            carrier = self._add_ns(f"{site.name}c")
            _sysctl(carrier, "net.ipv4.ip_forward", "1")
            self._uplink(carrier, "wan", f"s{i}c")
            _ip(carrier, "addr", "add", f"{wan_ip}/{PUBLIC_PREFIX}", "dev", "wan")
            self._veth(carrier, "lan", router, "wan")
            _ip(carrier, "link", "set", "lan", "up")
            _ip(carrier, "addr", "add", f"100.100.{i}.1/24", "dev", "lan")
            _ip(router, "link", "set", "wan", "up")
            _ip(router, "addr", "add", f"100.100.{i}.2/24", "dev", "wan")
            _ip(router, "route", "add", "default", "via", f"100.100.{i}.1")
            cg = nat.RouterPlan(nat="easy", wan_if="wan", lan_if="lan", lan_net=f"100.100.{i}.0/24",
                                wan_ip=wan_ip, hosts=())
            proc.run(["nft", "-f", "-"], netns=carrier, input=nat.router_ruleset(cg))
            router_wan = f"100.100.{i}.2"
        else:
            self._uplink(router, "wan", f"s{i}r")
            _ip(router, "addr", "add", f"{wan_ip}/{PUBLIC_PREFIX}", "dev", "wan")
            router_wan = wan_ip
        if site.loss > 0:               # bursts from the core reach the router's loss rule segmented
            self._udp_gso_off(self.core_ns, f"s{i}c" if site.cgnat else f"s{i}r")
        _ip(router, "link", "add", "lan", "type", "bridge")
        _ip(router, "link", "set", "lan", "up")
        _ip(router, "addr", "add", f"100.64.{i}.1/24", "dev", "lan")
        pairs = []
        for j, hname in enumerate(site.host_names(), start=1):
            ns = self._add_ns(hname)
            lan_ip = f"100.64.{i}.{10 + j}"
            self._veth(ns, "eth0", router, f"h{j}")
            _ip(router, "link", "set", f"h{j}", "master", "lan", "up")
            _ip(ns, "link", "set", "eth0", "up")
            _ip(ns, "addr", "add", f"{lan_ip}/24", "dev", "eth0")
            _ip(ns, "route", "add", "default", "via", f"100.64.{i}.1")
            if self._lossy:             # per-datagram loss (see _udp_gso_off)
                self._udp_gso_off(ns, "eth0")
            if site.loss > 0:           # lost at the router, then aggregated by the host
                self._gro_into_host(router, f"h{j}", ns)
            if site.nat == "one2one" and not site.cgnat:
                pub = f"198.18.{i}.{10 + j}"
                _ip(router, "addr", "add", f"{pub}/32", "dev", "wan")
            elif site.nat == "one2one":
                pub = f"100.100.{i}.{10 + j}"
                _ip(router, "addr", "add", f"{pub}/32", "dev", "wan")
            else:
                pub = router_wan
            pairs.append((lan_ip, pub))
            ip6 = self._host_v6(i, j, site, ns)
            self._add_host(hname, site, ns, lan_ip, wan_ip if site.cgnat else pub, f"100.64.{i}.1", ip6)
        plan = nat.RouterPlan(nat=site.nat, wan_if="wan", lan_if="lan", lan_net=f"100.64.{i}.0/24",
                              wan_ip=router_wan, hosts=tuple(pairs), hairpin=site.hairpin,
                              loss=site.loss, udp_blocked=site.udp_blocked)
        proc.run(["nft", "-f", "-"], netns=router, input=nat.router_ruleset(plan))
        if site.has_v6:
            self._router_v6(i, site, router)

    def _router_v6(self, i: int, site: SiteSpec, router: str) -> None:
        """IPv6 on a site's router (its ``wan`` and ``lan`` exist): routed, the core routes the
        site's prefix to it, the stateful firewall of ``ipv6.firewall_ruleset``."""
        _sysctl(router, "net.ipv6.conf.all.forwarding", "1")
        _addr6(router, "wan", ipv6.router_wan(i))
        _addr6(router, "lan", ipv6.router_lan(i))
        _no_mcast_snooping(router, "lan")
        _ip(router, "-6", "route", "add", "default", "via", ipv6.CORE_GW)
        _ip(self.core_ns, "-6", "route", "add", ipv6.site_net(i), "via", ipv6.router_wan(i))
        proc.run(["nft", "-f", "-"], netns=router,
                 input=ipv6.firewall_ruleset(wan_if="wan", loss=site.loss, udp_blocked=site.udp_blocked))

    def _host_v6(self, i: int, j: int, site: SiteSpec, ns: str) -> str | None:
        """A NATed site's host's IPv6 address and route (None on an IPv4-only site)."""
        if not site.has_v6:
            return None
        ip6 = ipv6.site_host(i, j)
        _addr6(ns, "eth0", ip6)
        _ip(ns, "-6", "route", "add", "default", "via", ipv6.router_lan(i))
        return ip6

    def _build_v6_site(self, i: int, site: SiteSpec, router: str) -> None:
        """An IPv6-only site behind its router: no IPv4 anywhere on it (the ``nat`` kind
        names the router, which only routes and filters)."""
        self._uplink(router, "wan", f"s{i}r")
        _ip(router, "link", "add", "lan", "type", "bridge")
        _ip(router, "link", "set", "lan", "up")
        if site.loss > 0:
            self._udp_gso_off(self.core_ns, f"s{i}r")
        for j, hname in enumerate(site.host_names(), start=1):
            ns = self._add_ns(hname)
            self._veth(ns, "eth0", router, f"h{j}")
            _ip(router, "link", "set", f"h{j}", "master", "lan", "up")
            _ip(ns, "link", "set", "eth0", "up")
            if self._lossy:
                self._udp_gso_off(ns, "eth0")
            if site.loss > 0:
                self._gro_into_host(router, f"h{j}", ns)
            ip6 = self._host_v6(i, j, site, ns)
            self._add_host(hname, site, ns, ip6, ip6, ipv6.router_lan(i), ip6)
        self._router_v6(i, site, router)

    def _add_host(self, name: str, site: SiteSpec, ns: str, lan: str, pub: str, gw: str | None,
                  ip6: str | None = None) -> None:
        self.hosts[name] = HostInfo(name=name, site=site.name, nat=site.nat + ("+cgnat" if site.cgnat else ""),
                                    netns=ns, lan_ip=lan, public_ip=pub, gateway=gw,
                                    xmpp_user=name, xmpp_password=services.new_password(), ip=site.ip, ip6=ip6)

    def _start_services(self) -> None:
        services.make_lab_ca(self.dir / "ca")
        if self.xmpp == "ejabberd":
            self._start_ejabberd()
        else:
            self._start_prosody()
        stage("starting coturn")
        # one coturn (two would share port 3478 by SO_REUSEPORT, and a restart would leave
        # the other relaying the allocations it holds)
        turn = services.Coturn(self.dir / "coturn", self.core_ns, TURN_USER, self.turn_password, v6=self.spec.has_v6)
        self.pids["coturn"] = turn.start(tied=self.tied)
        self._save()

    def _ejabberd(self):
        from .ejabberd import EjabberdCluster
        return EjabberdCluster(self.dir / "ejabberd", self.core_ns, self.dir / "ca", self.xmpp_addrs)

    def _start_ejabberd(self) -> None:
        """The cluster, its accounts (one per host and extra) and the overlays' rooms made in advance."""
        self.turn_password = services.new_password()
        stage(f"starting ejabberd ({self.xmpp_nodes} node(s))")
        accounts = [(h.xmpp_user, h.xmpp_password) for h in self.hosts.values()]
        self.pids.update(self._ejabberd().start(accounts, [], tied=self.tied))
        self._save()

    def create_room(self, room: str) -> None:
        """A MUC room made in advance (ejabberd; Prosody's rooms appear on the first join)."""
        if self.xmpp == "ejabberd":
            self._ejabberd().create_room(room)

    def kill_xmpp_node(self, i: int) -> None:
        """SIGKILL one ejabberd node (a server lost without a goodbye; its TCP peers see the reset)."""
        pid = self.pids.pop(f"ejabberd{i}", None)
        if pid and proc.alive(pid):
            os.kill(pid, signal.SIGKILL)
            proc.terminate(pid)          # reaps it
        self._save()

    def start_xmpp_node(self, i: int) -> None:
        self.pids[f"ejabberd{i}"] = self._ejabberd().restart_node(i, tied=self.tied)
        self._save()

    def _start_prosody(self) -> None:
        pros = services.Prosody(self.dir / "prosody", self.core_ns, self.dir / "ca", v6=self.spec.has_v6)
        pros.write_config()
        stage(f"XMPP accounts for {len(self.hosts)} hosts")
        for h in self.hosts.values():
            pros.register(h.xmpp_user, h.xmpp_password)
        self.turn_password = services.new_password()
        self._save()
        stage("starting Prosody")
        self.pids["prosody"] = pros.start(tied=self.tied)
        self._save()

    def restart_prosody(self, *, down_for: float = 0.0) -> None:
        """Stop Prosody and start it again (tests of reconnection)."""
        self.stop_service("prosody")
        if down_for:
            time.sleep(down_for)
        self.start_service("prosody")

    def stop_service(self, which: str) -> None:
        pid = self.pids.pop(which, None)
        if pid:
            proc.terminate(pid)
        self._save()

    def start_service(self, which: str) -> None:
        if which == "prosody":
            self.pids["prosody"] = services.Prosody(self.dir / "prosody", self.core_ns, self.dir / "ca").start(tied=self.tied)
        elif which == "coturn":
            self.pids["coturn"] = services.Coturn(self.dir / "coturn", self.core_ns, TURN_USER,
                                                  self.turn_password, v6=self.spec.has_v6).start(tied=self.tied)
        else:
            raise LabError(f"unknown service {which!r}")
        self._save()

    # -- status -----------------------------------------------------------------
    def status(self) -> dict:
        return {
            "name": self.spec.name,
            "hosts": [asdict(h) | {"up": h.netns in list_namespaces()} for h in self.hosts.values()],
            "services": {k: v | {"running": bool(v["pid"]) and proc.alive(v["pid"])} for k, v in self.services().items()},
        }


def _addr6(ns: str, dev: str, addr: str) -> None:
    """An IPv6 address usable at once: no duplicate address detection (the lab's plan has no
    duplicates), which would hold it tentative for a second or more."""
    _ip(ns, "-6", "addr", "add", f"{addr}/{ipv6.PREFIX}", "dev", dev, "nodad")


def _no_mcast_snooping(ns: str, bridge: str) -> None:
    """Neighbour discovery's multicast flooded on a lab bridge: with snooping on and no MLD
    querier, the bridge's group entries from the hosts' reports expire after some minutes."""
    _ip(ns, "link", "set", bridge, "type", "bridge", "mcast_snooping", "0")


def list_labs(state_root: Path = STATE_ROOT) -> list[str]:
    """Labs with state on disk or namespaces still present."""
    names = {p.name for p in Path(state_root).glob("*") if p.is_dir()}
    for ns in list_namespaces():
        if ns.startswith(NS_PREFIX) and "-" in ns[len(NS_PREFIX):]:
            names.add(ns[len(NS_PREFIX):].split("-", 1)[0])
    return sorted(names)


def orphaned_labs(state_root: Path = STATE_ROOT) -> list[str]:
    """Tied labs whose owner (a test run, a demo, a bench) is gone without tearing them down,
    e.g. killed with SIGKILL: their daemons died with the owner, their namespaces did not."""
    out = []
    for name in list_labs(state_root):
        try:
            data = json.loads((Path(state_root) / name / "state.json").read_text())
        except (OSError, ValueError):
            continue
        owner = data.get("owner")
        if data.get("tied") and isinstance(owner, int) and not proc.alive(owner):
            out.append(name)
    return out


def destroy_lab(name: str, *, state_root: Path = STATE_ROOT) -> list[str]:
    """Remove everything of lab ``name``: processes in its namespaces, pid-file daemons,
    namespaces (and with them their veths, bridges and nft rules), its state directory.
    Works from name prefix and pid files alone, so also after a crash. Returns what it removed."""
    removed: list[str] = []
    ldir = Path(state_root) / name
    prefix = ns_name(name, "")
    namespaces = [ns for ns in list_namespaces() if ns.startswith(prefix)]
    # 1. daemons named in pid files under the lab's state (Prosody, coturn, OVS, agents)
    stage(f"{name}: stopping daemons")
    for pidfile in ldir.rglob("*.pid") if ldir.exists() else []:
        pid = proc.read_pidfile(pidfile)
        if pid and proc.alive(pid) and _runs_a_lab_daemon(pid):
            proc.terminate(pid)
            removed.append(f"pid {pid} ({pidfile.name})")
    # 2. anything still running inside the lab's namespaces
    for ns in namespaces:
        pids = proc.run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in map(int, pids):
            proc.terminate(pid, grace=1.0)
            removed.append(f"pid {pid} in {ns}")
    # 3. the namespaces: deleting one removes its interfaces and peers of its veths
    for i, ns in enumerate(namespaces, 1):
        stage(f"{name}: namespace {i}/{len(namespaces)}")
        proc.run(["ip", "netns", "del", ns], check=False)
        removed.append(f"netns {ns}")
    if ldir.exists():
        import shutil
        shutil.rmtree(ldir, ignore_errors=True)
        removed.append(f"dir {ldir}")
    return removed


def _runs_a_lab_daemon(pid: int) -> bool:
    """Only kill a pid-file process if it still looks like ours (it runs a known daemon)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return False
    names = {b"ovsdb-server", b"ovs-vswitchd", b"turnserver", b"lua5.4", b"lua5.3", b"lua5.2", b"lua5.1", b"prosody",
             b"beam.smp", b"epmd"}
    text = b" ".join(cmd)
    return any(n in text for n in names) or b"ipop" in text or b"ipop_switch" in text
