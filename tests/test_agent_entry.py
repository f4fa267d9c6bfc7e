"""The agent's own entry (``python -m ipop_switch.agent``, what ``ipop-switch up`` execs): errors
are one line and exit 1 from either command, and the running agent's imports leave out the
CLI's (click, rich) and pygments (which slixmpp would load only to colour debug XML)."""

import subprocess
import sys



def test_errors_are_one_line_from_both_commands(tmp_path):
    missing = str(tmp_path / "none.toml")
    for argv in ([sys.executable, "-m", "ipop_switch.agent", "-c", missing],
                 [sys.executable, "-m", "ipop_switch.cli", "up", "-c", missing]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1
        assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("ipop-switch: error:")
        assert "no such config file" in r.stderr


PROBE = """
import sys
import ipop_switch.agent.__main__ as entry
try:
    entry._run(sys.argv[1], None)          # the imports happen first, then the config is refused
except Exception as e:
    print(type(e).__name__)
from ipop_switch.agent import node, overlay   # noqa: F401  (overlay brings signaling and slixmpp)
print(sorted(m for m in ("click", "rich", "pygments") if sys.modules.get(m) is not None))
"""


def test_the_agent_imports_no_cli_and_no_pygments(tmp_path):
    bad = tmp_path / "node.toml"
    bad.write_text("[node]\nnot_a_field = 1\n")
    r = subprocess.run([sys.executable, "-c", PROBE, str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    refused, mods = r.stdout.splitlines()
    assert refused.endswith("Error")
    assert mods == "[]"
