"""n2n (Debian package ``n2n``) between the two bench hosts: an L2 TAP VPN whose edges
register with a supernode and then send to each other directly.

Debian 12 ships n2n 1.3.2 (``1.3.1~svn3789``, the last v1 release, 2008): its edge has
no cipher choice (Twofish with the community key ``-k``, passed in ``N2N_KEY`` so it is not
on the command line) and none of v2/v3's AES/ChaCha20 (``-A``), ``-E`` or header
encryption. Set up as its README and ``edge -h`` describe:

- one supernode (``supernode -l 7654``) on the lab's public core, where a user's would be;
- one edge per host (``edge -d n2n0 -a ADDR -s MASK -c COMMUNITY -l SUPERNODE``) with a
  fixed local port (``-p``) so that its traffic can be counted, a fixed MAC (``-m``) and
  the default MTU (``-M 1400``, its safe value: the v1 header and Twofish's block padding
  must fit a 1500-byte underlay);
- no ``-r``: it lets an edge forward packets for other hosts (routing through the
  community), which two edges on one subnet do not need.

The per-run community key is random. Data must flow edge to edge: counted per port, the
supernode's port must carry only registrations (``outer_udp_ok``).
"""

from __future__ import annotations

import secrets

from .. import proc
from ..lab.services import XMPP_ADDR as SUPERNODE_ADDR     # the lab core's public address
from .peers import N2N_NET, UP_TIMEOUT, System, _counters

SUPERNODE_PORT = 7654
MTU = 1400
DIRECT = "Operational peers list size=1"    # an edge's log line once it sends to the other directly


class N2nEdge(System):
    """n2n 1.3.2 (Debian 12), TAP (layer 2), Twofish, edges direct after registering with a supernode."""

    PORT = 7655
    NEEDS = (("edge", "n2n"), ("supernode", "n2n"))

    def start(self) -> None:
        for b, pkg in self.NEEDS:
            proc.require(b, pkg)
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        self._count(self.PORT)
        self._count(SUPERNODE_PORT)
        sn = proc.spawn(["supernode", "-l", str(SUPERNODE_PORT)], netns=self.lab.core_ns, log=d / "supernode.log",
                        die_with_parent=True)
        self._procs.append(sn)
        self.supernode_pid = sn.pid
        proc.wait_for(lambda: bool(proc.run(["ss", "-H", "-lun", "sport", f"= :{SUPERNODE_PORT}"],
                                            netns=self.lab.core_ns, check=False).stdout.strip()) or sn.poll() is not None,
                      timeout=10, what="the n2n supernode")
        env = {"N2N_KEY": secrets.token_hex(16)}
        for idx, h in enumerate((self.a, self.b), 1):
            argv = ["edge", "-d", "n2n0", "-a", f"{N2N_NET}.{idx}", "-s", "255.255.255.0", "-c", "ipswbench",
                    "-l", f"{SUPERNODE_ADDR}:{SUPERNODE_PORT}", "-p", str(self.PORT),
                    "-m", f"02:98:05:00:00:{idx:02x}", "-M", str(MTU)]
            p = self._spawn(h, argv, d / f"{h}.log", env=env)
            (self.pids_a if h == self.a else self.pids_b).append(p.pid)
        self.addr_a, self.addr_b = f"{N2N_NET}.1", f"{N2N_NET}.2"
        self._wait_ping("n2n")
        # the first packets go through the supernode until the edges have registered with each
        # other (about a second): measure from then on
        logs = [d / f"{h}.log" for h in (self.a, self.b)]
        proc.wait_for(lambda: all(DIRECT in f.read_text(errors="replace") for f in logs),
                      timeout=UP_TIMEOUT, what=f"the n2n edges to register with each other (logs in {d})")

    def outer_udp_ok(self) -> bool:
        direct = _counters(self.lab, self.a, self.PORT)
        via_supernode = _counters(self.lab, self.a, SUPERNODE_PORT)
        # registrations (a few hundred bytes) go to the supernode; the data must go edge to edge
        return direct["tcp"] == 0 and direct["udp"] > 10 * max(via_supernode["udp"], 1)
