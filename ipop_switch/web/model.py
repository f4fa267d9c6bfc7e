"""The overlay graph the page draws, built from what one node knows (pure: no I/O, no agent).

Input (``agent/summaries.py``'s ``overlay_view``): this node (``me``), the members
(names, addresses, guests), this node's links in detail (``peers``: status's peer dicts),
the members' link summaries with their age, the LSA edges. Output: nodes and links with
everything the page shows, one link per pair of nodes whichever end reported it.

A member is ``up`` while its summary is fresh (``STALE`` s), ``down`` once it stops
arriving (a dead node: marked within ``STALE`` + the page's second), ``waiting`` before its
first one (``down`` then if our own link to it is not up). A link is listed when either end reports it up, or, with no summary from either
end, when an LSA has it (its path then unknown); a link of a down node is ``down``.
"""

from __future__ import annotations

from typing import Any

STALE = 7.0        # s: a summary older than this marks its node down (summaries come every 2 s)


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


def build_graph(v: dict[str, Any], *, stale: float = STALE) -> dict[str, Any]:
    me = v["me"]["node_id"]
    sums: dict[str, dict] = v.get("summaries") or {}
    own_state = {p["node_id"]: p.get("state") for p in v.get("peers") or []}
    nodes: dict[str, dict] = {}
    for info, is_me in [(v["me"], True)] + [(m, False) for m in v.get("members") or []]:
        nid = info["node_id"]
        s = sums.get(nid)
        if is_me:
            state, age = "self", 0.0
        elif s is not None:
            state, age = ("up" if s["age_s"] <= stale else "down"), s["age_s"]
        else:      # no summary yet: down if our own link to it is down, else waiting for one
            state, age = ("down" if own_state.get(nid, "up") != "up" else "waiting"), None
        nodes[nid] = {"id": nid, "name": info.get("name") or nid[:8], "addresses": list(info.get("addresses") or []),
                      "guests": list(info.get("guests") or []), "state": state, "summary_age_s": age,
                      "more_links": (s or {}).get("more", 0)}

    # every end's report of its links: (origin, peer) -> the report
    ends: dict[tuple[str, str], dict] = {}
    for origin, s in sums.items():
        for x in s["links"]:
            ends[(origin, x["peer"])] = x
    own_detail = {p["node_id"]: p for p in v.get("peers") or []}
    for x in v.get("own") or []:
        ends[(me, x["peer"])] = dict(x)
    for peer, p in own_detail.items():      # our own links: status's detail beats our summary
        e = ends.setdefault((me, peer), {"peer": peer, "tx_bps": 0.0, "rx_bps": 0.0})
        e.update({"state": "up" if p.get("state") == "up" else "connecting", "path": p.get("path"),
                  "rtt_ms": p.get("rtt_ms"), "role": p.get("role"), "uptime_s": p.get("uptime_s"),
                  "cand": p.get("candidates"), "hs_s": p.get("last_handshake_s"), "drops": p.get("drops") or {},
                  "local": p.get("local_addr"), "remote": p.get("remote_addr"),
                  "tx_bytes": p.get("tx_bytes"), "rx_bytes": p.get("rx_bytes")})

    links: dict[tuple[str, str], dict] = {}
    for (origin, peer), x in ends.items():
        if x.get("state") != "up" or origin not in nodes or peer not in nodes or origin == peer:
            continue
        a, b = _pair(origin, peer)
        links.setdefault((a, b), {"a": a, "b": b, "ends": {}})["ends"][origin] = x
    for origin, peer in v.get("lsa_edges") or []:
        if origin in nodes and peer in nodes and origin != peer:
            pair = _pair(origin, peer)
            if pair not in links and not (origin in sums or peer in sums or me in pair):
                links[pair] = {"a": pair[0], "b": pair[1], "ends": {}, "source": "lsa"}

    out_links = []
    for (a, b), l in sorted(links.items()):
        ea, eb = l["ends"].get(a), l["ends"].get(b)
        reports = [e for e in (ea, eb) if e]
        paths = {e.get("path") for e in reports}
        path = "relay" if "relay" in paths else "direct" if "direct" in paths else "unknown"
        roles = [e.get("role") for e in reports if e.get("role")]
        role = "on-demand" if "on-demand" in roles else (roles[0] if roles else None)
        rtts = [e["rtt_ms"] for e in reports if e.get("rtt_ms") is not None]
        # a -> b: what a sends (or, without a's report, what b receives)
        ab = ea["tx_bps"] if ea else eb["rx_bps"] if eb else None
        ba = eb["tx_bps"] if eb else ea["rx_bps"] if ea else None
        down = "down" in (nodes[a]["state"], nodes[b]["state"])
        out_links.append({
            "id": f"{a}-{b}", "a": a, "b": b, "state": "down" if down else "up", "path": path, "role": role,
            "on_demand": role == "on-demand", "rtt_ms": round(min(rtts), 2) if rtts else None,
            "a_to_b_bps": ab, "b_to_a_bps": ba,
            "uptime_s": max((e.get("uptime_s") or 0 for e in reports), default=None) if reports else None,
            "mine": me in (a, b), "source": l.get("source", "summary"),
            "ends": {k: e for k, e in (("a", ea), ("b", eb)) if e},
        })
    degree: dict[str, int] = {}
    for l in out_links:
        for n in (l["a"], l["b"]):
            degree[n] = degree.get(n, 0) + 1
    node_list = sorted(nodes.values(), key=lambda n: n["id"])
    for n in node_list:
        n["links"] = degree.get(n["id"], 0)
    return {
        "overlay": v["overlay"], "me": me, "topology": v.get("topology") or {},
        "nodes": node_list, "links": out_links,
        "counts": {"nodes": len(node_list), "links": len(out_links),
                   "down": sum(n["state"] == "down" for n in node_list),
                   "relayed": sum(l["path"] == "relay" for l in out_links)},
    }
