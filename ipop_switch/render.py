"""Status as tables a person reads (the JSON is for scripts): a node's ``ipop-switch status``
and a lab's hosts and services. Shared by the CLI, the demo and the benchmarks; it reads
only the status documents, never the parts that make them."""

from __future__ import annotations


from rich.console import Console
from rich.table import Table


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    return f"{seconds / 60:.0f}m ago"


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _cn(subject: str | None) -> str:
    """A certificate subject's common name (the node's name), or the subject itself."""
    subject = subject or ""
    return subject.split("CN=", 1)[1].split(",")[0] if "CN=" in subject else subject


def render_status(st: dict, console: Console) -> None:
    node = st.get("node", {})
    console.print(f"node [bold]{node.get('node_id', '?')}[/]  agent pid {node.get('pid', '?')}, up {_dur(node.get('uptime_s'))}"
                  + (f", OVS {node['ovs']}" if node.get("ovs") else "")
                  + (f", tunnel loops in {node['tunnel_loops']}" if node.get("tunnel_loops") else ""))
    for note in node.get("notes", []):
        console.print(f"  note: {note}")
    for ov in st.get("overlays", []):
        sig = ov.get("signaling", {})
        drops = ", ".join(f"{k} {v}" for k, v in sorted(sig.get("drops", {}).items()) if v) or "none"
        console.print(f"\noverlay [bold]{ov['name']}[/] ({ov.get('kind', 'group')}), bridge {ov.get('bridge')}, "
                      f"address {ov.get('address')}{' ' + ov['address6'] if ov.get('address6') else ''}; "
                      f"signaling {sig.get('state', '?')} ({sig.get('server', '')}), dropped messages: {drops}")
        t = Table(show_edge=False)
        # the role column only where links have roles other than all-to-all (a structured overlay)
        roles = any(p.get("role") not in (None, "all-to-all") for p in ov.get("peers", []))
        for col in ("peer", "name", *(("role",) if roles else ()), "state", "path (local->remote candidate)",
                    "remote address", "RTT", "tx / rx", "drops", "handshake", "uptime"):
            t.add_column(col)
        names = {p["node_id"]: _cn(p.get("subject")) for p in ov.get("peers", [])}
        for p in ov.get("peers", []):
            state = p.get("state", "?")
            color = {"up": "green", "connecting": "yellow", "backoff": "yellow", "waiting": "yellow"}.get(state, "red")
            path = p.get("path") or "-"
            if p.get("candidates") and path != "-":
                path = f"{path} ({p['candidates']})"
            if p.get("family") and path != "-":     # the underlay the link's datagrams take
                path = f"{path} {'IPv6' if p['family'] == 'ipv6' else 'IPv4'}"
            if p.get("reach") == "peer-assisted":         # no link of its own: through another member
                via = p.get("via") or "?"
                path = f"peer-assisted via {names.get(via) or via[:12]}"
                if (p.get("hops") or 2) > 2:
                    path += f" ({p['hops']} hops)"
            elif p.get("reach") == "unreachable":
                path = "[red]unreachable[/]"
            if (p.get("direct_failed") or {}).get("retry_in_s"):   # no path found: tried again then
                state += f" {p['direct_failed']['retry_in_s']:.0f}s"
            drops = ", ".join(f"{k} {v}" for k, v in sorted((p.get("drops") or {}).items()) if v) or "-"
            name = names[p["node_id"]] or "-"
            remote = (p.get("remote_addr") or "-").split()[-1]
            t.add_row(
                p["node_id"][:12], name, *((p.get("role") or "-",) if roles else ()), f"[{color}]{state}[/]", path, remote,
                f"{p['rtt_ms']:.2f} ms" if p.get("rtt_ms") is not None else "-",
                f"{_bytes(p.get('tx_bytes'))} / {_bytes(p.get('rx_bytes'))}",
                drops, _ago(p.get("last_handshake_s")), _dur(p.get("uptime_s")),
            )
        if ov.get("peers"):
            console.print(t)
        else:
            console.print("  no peers yet")
        topo = ov.get("topology")
        if topo:
            roles = ", ".join(f"{r} {n}" for r, n in sorted((topo.get("roles") or {}).items())) or "none"
            far = topo.get("unreachable") or []
            console.print(f"  topology: {topo.get('mode')}, {topo.get('members')} members, {topo.get('degree')} links "
                          f"(max {topo.get('max_degree')}: {roles}); graph {topo.get('edges')} links, "
                          f"{topo.get('reachable')} members reachable in at most {topo.get('max_hops')} hops"
                          + (f", [red]{len(far)} unreachable[/]" if far else "")
                          + (f"; refused {topo['refused_requests']} requests" if topo.get("refused_requests") else ""))
        if ov.get("guests"):
            render_guests(ov["guests"], console)
        refused = {k: v for k, v in (ov.get("switch") or {}).items()
                   if k in ("macs_refused", "datapaths_refused", "packet_in_dropped", "bad_frames") and v}
        if refused:
            console.print("  switch app: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(refused.items())))
        dns = ov.get("dns")
        if dns:
            ddrops = ", ".join(f"{k} {v}" for k, v in sorted((dns.get("drops") or {}).items()) if v) or "none"
            console.print(f"  dns: {dns.get('zone')} on {', '.join(dns.get('listen') or [])}, {dns.get('names')} names, "
                          f"{dns.get('queries', 0)} queries ({dns.get('answers', 0)} answered, "
                          f"{dns.get('nxdomain', 0)} NXDOMAIN, {dns.get('refused', 0)} refused, "
                          f"{dns.get('forwarded', 0)} forwarded), dropped: {ddrops}"
                          + (f"; names claimed twice: {', '.join(dns['conflicts'])}" if dns.get("conflicts") else ""))
        if ov.get("social"):
            render_social(ov["social"], console)
        for note in ov.get("notes", []):
            console.print(f"  note: {note}")


def render_social(soc: dict, console: Console) -> None:
    """A social overlay's friends (what 'friends list' shows): each friend node's state, the
    address this node gave it, path and RTT, its pin; the refused keys and counted drops."""
    nodes = [(bare, f, node, n) for bare, f in soc.get("friends", {}).items() for node, n in f.get("nodes", {}).items()]
    friends = [b for b, f in soc.get("friends", {}).items() if f.get("subscription") == "both"]   # not our own devices
    console.print(f"  social: {soc.get('jid')}/{soc.get('node')} at {soc.get('address')} (friends in {soc.get('range')}); "
                  f"{len(friends)} friends, {sum(1 for *_, n in nodes if n.get('state') == 'linked')} of "
                  f"{len(nodes)} nodes linked")
    pending = [b for b, f in soc.get("friends", {}).items() if f.get("asked") or f.get("requested")]
    if pending:
        console.print("  friend requests: " + ", ".join(
            f"{b} ({'asked' if soc['friends'][b].get('asked') else 'wants to be friends'})" for b in pending))
    if nodes:
        t = Table(show_edge=False, title="friends", title_justify="left")
        for col in ("friend", "node", "state", "address", "path", "RTT", "fingerprint"):
            t.add_column(col)
        for bare, f, node, n in nodes:
            state = n.get("state", "?")
            color = {"linked": "green", "pending": "yellow", "offline": "dim"}.get(state, "red")
            rtt = f"{n['rtt_ms']:.2f} ms" if n.get("rtt_ms") is not None else "-"
            fp = (n.get("fingerprint") or "")[:19] + ("... verified" if n.get("verified") else "...")
            t.add_row(bare, node, f"[{color}]{state}[/]", n.get("address", "-"), n.get("path") or "-", rtt, fp)
        console.print(t)
        for bare, f, node, n in nodes:
            if n.get("refused"):
                console.print(f"  [red]REFUSED[/] a new key of {bare}/{node} ({n['refused']['fingerprint'][:19]}..., "
                              f"{n['refused']['count']} times): compare, then 'ipop-switch friends forget {bare} {node}'")
    drops = ", ".join(f"{k} {v}" for k, v in sorted((soc.get("drops") or {}).items()) if v)
    if drops:
        console.print(f"  social refusals: {drops}")


def render_guests(guests: list[dict], console: Console) -> None:
    """The overlay's guests: where they are, their port, MAC, what the switch saw behind the
    port (MACs, traffic, drops), and anything wrong with them."""
    t = Table(show_edge=False, title="guests", title_justify="left")
    for col in ("guest", "attached", "port", "MAC", "MACs seen", "rx / tx", "drops"):
        t.add_column(col)
    for g in guests:
        if g.get("error"):
            t.add_row(g["name"], f"[red]not attached[/]: {g['error']}", "-", "-", "-", "-", "-")
            continue
        drops = ", ".join(f"{k} {v}" for k, v in sorted((g.get("drops") or {}).items()) if v) or "-"
        rx_tx = (f"{_bytes(g.get('rx_bytes'))} / {_bytes(g.get('tx_bytes'))}"
                 if g.get("rx_bytes") is not None else "-")
        macs = g.get("macs")
        t.add_row(g["name"], g.get("where", "?") + (" (DHCP server)" if g.get("dhcp_server") else ""),
                  g.get("port", "-"), g.get("mac") or "-", str(len(macs)) if macs is not None else "-",
                  rx_tx, drops)
    console.print(t)
    for g in guests:
        for note in g.get("notes") or []:
            console.print(f"  note: guest {g['name']}: {note}")


def render_lab(st: dict, console: Console) -> None:
    """A lab's hosts (LAN/public address, NAT kind) and its services, from ``Lab.status()``."""
    t = Table(title=f"lab {st['name']}: hosts")
    for col in ("host", "site", "NAT", "LAN address", "public address", "namespace", "up"):
        t.add_column(col)
    for h in st["hosts"]:
        t.add_row(h["name"], h["site"], h["nat"], h["lan_ip"], h["public_ip"], h["netns"], "yes" if h["up"] else "NO")
    console.print(t)
    s = Table(title="services (core namespace)")
    for col in ("service", "address", "details", "running"):
        s.add_column(col)
    x, tu = st["services"]["xmpp"], st["services"]["turn"]
    s.add_row("XMPP (Prosody)", f"{x['address']}:{x['port']}", f"domain {x['domain']}, MUC {x['muc']}, CA {x['ca']}",
              "yes" if x["running"] else "NO")
    s.add_row("STUN/TURN (coturn)", f"{tu['address']}:{tu['port']}", f"also STUN on {tu['stun2']}; user {tu['user']}",
              "yes" if tu["running"] else "NO")
    console.print(s)
