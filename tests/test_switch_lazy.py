"""The switch app's deferred imports (ryu_apps/lazy.py): what the app never uses is not
executed at start-up, and a deferred module still works the moment something uses it."""

import subprocess
import sys

PROBE = r"""
import sys
from ryu_apps import lazy
lazy.install()
from os_ken import cfg
from os_ken.base.app_manager import AppManager
import ryu_apps.ofp_unix, ryu_apps.switch
real = lambda m: type(sys.modules.get(m)).__name__ == "module"
print(sorted(m for m in (*lazy.OTHER_PARSERS, *lazy.PACKET_MODULES, lazy.PACKET, "os_ken.lib.packet.bgp") if real(m)))
from os_ken.ofproto import ofproto_v1_3_parser as p13, ofproto_v1_0_parser as p10
# the 1.3 parser works without the packet library: a PacketOut of bytes serializes
from os_ken.ofproto import ofproto_v1_3 as o13
class DP:
    ofproto, ofproto_parser, id = o13, p13, 1
out = p13.OFPPacketOut(DP(), buffer_id=o13.OFP_NO_BUFFER, in_port=o13.OFPP_CONTROLLER,
                       actions=[p13.OFPActionOutput(1)], data=b"\xff" * 60)
out.serialize()
print(len(out.buf))
print(p10.OFPHello.__module__, real("os_ken.ofproto.ofproto_v1_0_parser"))
from os_ken.lib.packet import ipv6
print(ipv6.ipv6.__name__, real("os_ken.lib.packet.ipv6"))
"""


def test_deferred_modules_are_not_loaded_until_used():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "[]"                     # nothing deferred was executed at start-up
    assert int(lines[1]) == 24 + 16 + 60        # header and fields, one output action, the frame
    assert lines[2] == "os_ken.ofproto.ofproto_v1_0_parser True"   # loaded on first use
    assert lines[3] == "ipv6 True"
