"""``ipop-switch lab demo --keep`` as a new user tries it (issue 20, done when): it prints the
URL of the overlay view on this machine's loopback, the page there shows the demo's overlay
with the relayed link, the names resolve from every node, and the nodes keep running after
the demo returns, until ``lab down``. With IPSW_WEB_SHOT=path the page is also captured there
by headless Chromium (how docs/overlay-view.png is made)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import unique_name
from ipop_switch.lab import list_labs

pytestmark = [pytest.mark.lab, pytest.mark.slow]

DEMO_TIMEOUT = 300.0


def graph(url: str) -> dict:
    with urllib.request.urlopen(url + "api/graph", timeout=5) as r:
        return json.load(r)


def test_demo_keep_prints_the_page_and_names(tmp_path):
    name = unique_name("v")
    out = tmp_path / "demo.json"
    try:
        r = subprocess.run([sys.executable, "-m", "ipop_switch.cli", "lab", "demo", "--name", name, "--keep",
                            "--guests", "1", "--json", str(out)], capture_output=True, text=True, timeout=DEMO_TIMEOUT,
                           env={**os.environ, "COLUMNS": "200"})
        assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-2000:])
        res = json.loads(out.read_text())
        # every node's and guest's name, from every node: 3 nodes x (3 nodes + 3 guests)
        assert len(res["names"]) == 3 * 6 and all(v and len(v) == 1 for v in res["names"].values()), res["names"]
        url = res["web_url"]
        assert re.match(r"^http://127\.0\.0\.1:\d+/$", url) and url in r.stdout, r.stdout[-2000:]
        assert "dig +short @127.53." in r.stdout
        # the demo has returned: the page still answers, and the overlay on it is whole
        g, deadline = None, time.monotonic() + 30
        while time.monotonic() < deadline:
            g = graph(url)
            if g["counts"]["links"] == 3 and all(n["state"] in ("self", "up") for n in g["nodes"]):
                break
            time.sleep(1)
        assert g and g["counts"] == {"nodes": 3, "links": 3, "down": 0, "relayed": 1}, g
        relayed = [l for l in g["links"] if l["path"] == "relay"]
        names = {n["id"]: n["name"] for n in g["nodes"]}
        assert {names[relayed[0]["a"]], names[relayed[0]["b"]]} == {"s2h1", "s3h1"}      # easy - hard
        with urllib.request.urlopen(url, timeout=5) as page:
            assert b"/assets/app.js" in page.read()
        shot = os.environ.get("IPSW_WEB_SHOT")
        if shot:
            sys.path.insert(0, str(Path(__file__).parent))
            from helpers.chromium import Chromium
            lab = [sys.executable, "-m", "ipop_switch.cli", "lab", "exec", "--name", name]
            traffic = []          # some traffic for the picture: rates on the relayed and on a direct link
            for srv, cli_, addr, rate in (("s3h1", "s2h1", "100.99.0.3", "40M"), ("s2h1", "s1h1", "100.99.0.2", "150M")):
                traffic.append(subprocess.Popen(lab + [srv, "iperf3", "-s", "-1", "-B", addr], stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL))
                time.sleep(0.5)
                traffic.append(subprocess.Popen(lab + [cli_, "iperf3", "-c", addr, "-t", "15", "-b", rate],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            b = Chromium(tmp_path, width=1280, height=720)
            try:
                b.goto(url)
                b.wait_for("document.querySelectorAll('#nodes g.node[data-state=up]').length == 2", 20)
                time.sleep(6)
                b.eval("document.querySelector('#links line.link[data-path=relay]').dispatchEvent(new MouseEvent('click'))")
                time.sleep(1.5)
                b.screenshot(Path(shot))
            finally:
                b.close()
                for p in traffic:
                    p.wait(timeout=30)
    finally:
        subprocess.run([sys.executable, "-m", "ipop_switch.cli", "lab", "down", "--name", name], capture_output=True,
                       timeout=120)
    assert name not in list_labs()
