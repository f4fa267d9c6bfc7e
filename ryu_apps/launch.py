"""Run the overlay switch app: ``python -m ryu_apps.launch --channel SOCK --ofp-socket SOCK``.

os-ken 4.x ships no ``osken-manager``; this launcher sets os-ken's options, makes its
OpenFlow listener a unix socket (ofp_unix.py: no TCP port another local user could reach
or take over), passes our settings to the app and runs it with AppManager.run_apps. The
default hub is plain threads. The agent starts it as a child process inside the node's
namespace, both sockets in the node's private run directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ryu_apps.launch", description="ipop-switch OpenFlow app")
    ap.add_argument("--channel", required=True, help="unix socket path for the agent's JSON-lines channel")
    ap.add_argument("--ofp-socket", required=True, help="unix socket path the bridge connects to (OpenFlow)")
    ap.add_argument("--dpid", type=lambda v: int(v, 0), default=None,
                    help="the bridge's datapath id: every other switch is refused (unset: all, until set_datapath)")
    ap.add_argument("--aging", type=int, default=300, help="MAC aging in seconds")
    ap.add_argument("--mtu", type=int, default=0, help="overlay MTU for MSS clamping (0: off until set)")
    ap.add_argument("--max-macs", type=int, default=8192, help="learned MACs in total")
    ap.add_argument("--max-macs-per-port", type=int, default=1024, help="learned MACs behind one port")
    ap.add_argument("--ovs-rundir", default="", help="ovs-vswitchd's run directory (to purge its flow cache "
                    "after pipeline changes; unset: never purged)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from . import lazy
    lazy.install()                     # before os-ken: what the app never uses is not loaded

    from os_ken import cfg
    from os_ken.base.app_manager import AppManager

    from . import ofp_unix, switch

    cfg.CONF(args=["--ofp-tcp-listen-port=6653"], project="os_ken")  # not opened: see ofp_unix.install
    ofp_unix.install(a.ofp_socket)
    switch.SETTINGS.channel = a.channel
    switch.SETTINGS.aging = a.aging
    switch.SETTINGS.mtu = a.mtu
    switch.SETTINGS.dpid = a.dpid
    switch.SETTINGS.max_macs = a.max_macs
    switch.SETTINGS.max_macs_per_port = a.max_macs_per_port
    switch.SETTINGS.ovs_rundir = a.ovs_rundir
    # SIGTERM/SIGINT: leave at once (the native hub's threads cannot be killed, only abandoned)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: os._exit(0))
    AppManager.run_apps(["ryu_apps.switch"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
