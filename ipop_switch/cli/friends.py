"""``ipop-switch friends``: the SocialVPN friend list of the running agent (docs/social.md).
Every subcommand goes to the agent through its status socket; friends are the XMPP roster's
mutual subscriptions, so another XMPP client of the same account sees (and may change) them too."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .guests import _config, _json, _overlay, _send, _socket


def _ask(ctx: click.Context, **cmd) -> dict:
    o = ctx.obj
    return _send(o["config"], o["socket"], {"cmd": "friends", "overlay": o["overlay"], **cmd})


@click.group("friends")
@_config
@_socket
@_overlay
@click.pass_context
def friends(ctx: click.Context, config_path: str, sock: str | None, overlay: str | None) -> None:
    """SocialVPN: friends from your XMPP roster, their nodes, pinned keys and local addresses."""
    ctx.obj = {"config": config_path, "socket": sock, "overlay": overlay}


def _simple(op: str, doc: str, *args: str) -> None:
    """A subcommand that hands its arguments to the agent and prints the agent's answer."""
    def run(ctx: click.Context, **kw: str) -> None:
        click.echo(_ask(ctx, op=op, **kw)["text"])
    for name in reversed(args):
        run = click.argument(name)(run)
    friends.command(op, help=doc)(click.pass_context(run))


_simple("add", "Ask JID to be friends (an XMPP presence subscription); they run 'friends accept'.", "jid")
_simple("accept", "Accept JID's friend request (and ask back, so the subscription is mutual).", "jid")
_simple("remove", "End the friendship: subscriptions both ways and the roster entry; links go at once.", "jid")
_simple("verify", "Mark JID's node pinned with FINGERPRINT as verified (compared out of band).", "jid", "fingerprint")
_simple("forget", "Drop the pin of JID's NODE: its current key is pinned on next sight (after a re-install).",
        "jid", "node")


@friends.command("hosts")
@click.pass_context
def hosts(ctx: click.Context) -> None:
    """Hosts-file lines: <address> <node>.<friend>.<suffix> for every known friend node."""
    for line in _ask(ctx, op="hosts")["lines"]:
        click.echo(line)


@friends.command("list")
@_json
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """Each friend and each of the friend's nodes: state, pinned fingerprint, local address, path, RTT."""
    ans = _ask(ctx, op="list")
    ans.pop("ok", None)
    if as_json:
        click.echo(json.dumps(ans, indent=1))
        return
    click.echo(f"{ans['jid']}/{ans['node']} at {ans['address']} (friends get addresses of {ans['range']})")
    click.echo(f"  this node's fingerprint (read it out to your friends): {ans['fingerprint']}")
    for bare, f in ans["friends"].items():
        extra = " (asked, waiting)" if f["asked"] else " (wants to be friends: 'friends accept')" if f["requested"] else ""
        click.echo(f"{bare}  {f['subscription']}{extra}")
        for node, n in f["nodes"].items():
            rtt = f" {n['rtt_ms']:.1f} ms" if n.get("rtt_ms") is not None else ""
            click.echo(f"  {node:<16} {n['state']:<8} {n['address']:<15} {n['path'] or '-'}{rtt}  "
                       f"{n['fingerprint']}{' verified' if n['verified'] else ''}")
            if n.get("refused"):
                click.echo(f"  {'':<16} REFUSED key {n['refused']['fingerprint']} ({n['refused']['count']} times): "
                           f"compare, then 'ipop-switch friends forget {bare} {node}'")
    if ans.get("drops"):
        click.echo("drops: " + ", ".join(f"{k} {v}" for k, v in sorted(ans["drops"].items())))


COMMANDS = [friends]
