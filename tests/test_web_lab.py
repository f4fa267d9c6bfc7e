"""The overlay view in a real browser: four real agents (ipop-switch up) behind none, one2one,
easy and hard NATs (the easy-hard pair relayed through TURN); pubh1 serves the page
([node.web]) in its namespace, the lab's forwarder (lab/webfwd.py) carries it to this
machine's loopback, and headless Chromium (DevTools protocol) loads it as a person would.
The live DOM has 4 nodes and 6 links, the easy-hard one marked relayed, the others direct;
a screenshot is written to the test's directory. Then hardh1 is killed: the page marks it
down (or drops it) within 10 s."""

from __future__ import annotations

import json
import time

import pytest

from conftest import unique_name
from helpers.chromium import Chromium, chromium_path
from ipop_switch.lab import Lab, LabSpec, SiteSpec
from ipop_switch.lab.nodes import WEB_PORT, LabGroup
from ipop_switch.lab.probes import wait_links
from ipop_switch.lab.webfwd import forward

pytestmark = [pytest.mark.lab, pytest.mark.slow]

HOSTS = ("pubh1", "oneh1", "easyh1", "hardh1")
VIEWER = "pubh1"
LINKS_TIMEOUT = 60.0
PAGE_TIMEOUT = 40.0       # first summaries of every member: subscribe, then one every 2 s
DOWN_WITHIN = 10.0        # the bound for a dead node on the page

# the page's live state, read from its DOM (the graph's own elements, not the legend)
STATE_JS = """JSON.stringify({
  nodes: [...document.querySelectorAll('#nodes g.node')].map(n => ({id: n.dataset.id, state: n.dataset.state,
                                                                      name: n.dataset.name})),
  links: [...document.querySelectorAll('#links line.link')].map(l => ({a: l.dataset.a, b: l.dataset.b,
                                                          path: l.dataset.path, state: l.dataset.state})),
  counts: Object.assign({}, document.getElementById('counts').dataset),
  text: document.getElementById('counts').textContent})"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if chromium_path() is None:
        pytest.fail("chromium is not installed: ./bootstrap.sh install adds Debian's chromium")
    lab = Lab(LabSpec(name=unique_name("w"), sites=(SiteSpec("pub", "none"), SiteSpec("one", "one2one"),
                                                   SiteSpec("easy", "easy"), SiteSpec("hard", "hard"))))
    group = None
    fwd = None
    try:
        lab.up()
        group = LabGroup(lab, "view", net=92, extra={"port_prediction": False})   # the easy-hard link relayed
        for h in HOSTS:
            group.add(h, web=h == VIEWER)
            group.start(h)
        assert wait_links(group, timeout=LINKS_TIMEOUT) is not None, "links did not all come up"
        fwd = forward(lab, VIEWER, WEB_PORT)
        assert fwd is not None, f"the forwarder did not start (see {lab.dir / 'webfwd'})"
        browser = Chromium(tmp_path_factory.mktemp("chromium"))
        try:
            yield lab, group, fwd[0], browser
        finally:
            browser.close()
    finally:
        if group:
            group.stop_all()
        lab.down()


def page_state(browser: Chromium) -> dict:
    return json.loads(browser.eval(STATE_JS))


def test_page_shows_four_nodes_six_links_the_relayed_one_marked(world, tmp_path):
    lab, g, url, browser = world
    ids = {h: g.nodes[h].node_id for h in HOSTS}
    browser.goto(url)
    # every member's summary arrived: 4 nodes, none waiting, 6 links
    browser.wait_for("(() => { const c = document.getElementById('counts').dataset;"
                     " const w = document.querySelectorAll('#nodes g.node[data-state=waiting]').length;"
                     " return c.nodes === '4' && c.links === '6' && w === 0; })()", PAGE_TIMEOUT)
    st = page_state(browser)
    assert len(st["nodes"]) == 4 and len(st["links"]) == 6, st
    assert {n["id"] for n in st["nodes"]} == set(ids.values())
    states = {n["id"]: n["state"] for n in st["nodes"]}
    assert states[ids[VIEWER]] == "self" and all(states[ids[h]] == "up" for h in HOSTS if h != VIEWER), states
    assert {frozenset((l["a"], l["b"])) for l in st["links"]} == \
        {frozenset((ids[a], ids[b])) for i, a in enumerate(HOSTS) for b in HOSTS[i + 1:]}
    relayed = [l for l in st["links"] if l["path"] == "relay"]
    assert [frozenset((l["a"], l["b"])) for l in relayed] == [frozenset((ids["easyh1"], ids["hardh1"]))], st["links"]
    assert all(l["path"] == "direct" and l["state"] == "up" for l in st["links"] if l not in relayed), st["links"]
    assert "1 relayed" in st["text"]
    # the relayed link's details, as a click shows them: relayed, its candidate pair from both ends
    browser.eval("document.querySelector('#links line.link[data-path=relay]').dispatchEvent(new MouseEvent('click'))")
    details, _ = browser.wait_for("document.getElementById('details').innerText.includes('relayed (TURN)')"
                                  " && document.getElementById('details').innerText", 5)
    assert "easyh1" in details and "hardh1" in details and "candidate pair" in details and "relay" in details
    shot = browser.screenshot(tmp_path / "overlay-view.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_a_killed_node_is_marked_down_within_10s(world, tmp_path):
    lab, g, url, browser = world
    hard = g.nodes["hardh1"].node_id
    browser.wait_for(f"document.querySelector('#nodes g.node[data-id=\"{hard}\"]')?.dataset.state === 'up'", 20)
    g.stop("hardh1", kill=True)
    t0 = time.monotonic()
    _, took = browser.wait_for(
        f"(() => {{ const n = document.querySelector('#nodes g.node[data-id=\"{hard}\"]');"
        f" return !n || n.dataset.state === 'down'; }})()", DOWN_WITHIN + 5)
    took = time.monotonic() - t0
    print(f"hardh1 killed: marked down on the page after {took:.1f}s")
    browser.screenshot(tmp_path / "overlay-view-down.png")
    assert took <= DOWN_WITHIN, f"marked down after {took:.1f}s (> {DOWN_WITHIN:.0f}s)"
    st = page_state(browser)
    assert all(l["state"] == "down" for l in st["links"] if hard in (l["a"], l["b"])), st["links"]
    assert all(n["state"] in ("self", "up") for n in st["nodes"] if n["id"] != hard), st["nodes"]
