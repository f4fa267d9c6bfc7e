"""The identity commands: ``ipop-switch init``, ``whoami`` and ``group create|issue|join|revoke``."""

from __future__ import annotations

import json
from pathlib import Path

import click
from cryptography import x509

from ..identity.ca import GroupCA
from ..identity.certs import IdentityError, node_id_of
from ..identity.files import read_file
from ..identity.store import DEFAULT_DIR, NodeIdentity

DEFAULT_GROUPS = Path("/etc/ipop-switch/groups")

_dir_opt = click.option("--dir", "dir_", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DIR,
                        show_default=True, help="the node's identity directory")
_groups_opt = click.option("--dir", "groups", type=click.Path(file_okay=False, path_type=Path),
                           default=DEFAULT_GROUPS, show_default=True, help="where group CAs live (admin side)")


@click.command("init")
@_dir_opt
@click.option("--name", help="a human name put in the certificate request (default: the host name)")
@click.option("--force", is_flag=True, help="replace an existing identity (a new node id: peers will not know it)")
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("/etc/ipop-switch/node.toml"), show_default=True,
              help="also write a starter node config here (never overwritten)")
@click.option("--json", "as_json", is_flag=True)
def init_cmd(dir_: Path, name: str | None, force: bool, config: Path, as_json: bool) -> None:
    """Create this node's identity (keys, node id, a certificate request for a group admin)
    and a starter config to edit."""
    from ..starter import write_starter_config
    ident = NodeIdentity.create(dir_, name=name, force=force)
    wrote = write_starter_config(config, identity_dir=dir_)
    out = {"node_id": ident.node_id, "dir": str(dir_), "request": str(dir_ / "node.csr"),
           "config": str(config) if wrote else None}
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(f"node id {ident.node_id}\nidentity in {dir_} (private keys mode 0600)\n"
                   f"certificate request: {dir_ / 'node.csr'} -> give it to the group admin "
                   f"('ipop-switch group issue'), then 'ipop-switch group join BUNDLE'")
        click.echo(f"starter config written to {config}: edit the XMPP, STUN/TURN and address fields"
                   if wrote else f"config {config} exists: left as it is")


@click.command("whoami")
@_dir_opt
@click.option("--json", "as_json", is_flag=True)
def whoami_cmd(dir_: Path, as_json: bool) -> None:
    """Show this node's id and its verified overlay memberships."""
    ident = NodeIdentity.load(dir_)
    groups = []
    for ov in ident.overlays():
        try:
            m = ident.membership(ov)
            groups.append({"overlay": ov, "subject": m.own.subject, "fingerprint": m.own.fingerprint,
                           "not_after": m.own.not_after.isoformat(), "ok": True})
        except Exception as e:  # one broken membership must not hide the others
            groups.append({"overlay": ov, "ok": False, "error": str(e)})
    if as_json:
        click.echo(json.dumps({"node_id": ident.node_id, "groups": groups}))
        return
    click.echo(f"node id {ident.node_id}")
    for g in groups:
        click.echo(f"  {g['overlay']}: " + (f"{g['subject']}  valid to {g['not_after']}  {g['fingerprint']}"
                                            if g["ok"] else f"NOT USABLE: {g['error']}"))


@click.group("group")
def group_cmd() -> None:
    """GroupVPN trust: a group CA signs the certificates of its member nodes."""


@group_cmd.command("create")
@click.argument("name")
@_groups_opt
@click.option("--force", is_flag=True, help="replace an existing CA of that name (every member needs a new cert)")
def group_create(name: str, groups: Path, force: bool) -> None:
    """Create the group NAME: its CA key and certificate, group config and an empty CRL."""
    ca = GroupCA.create(groups / name, name, force=force)
    click.echo(f"group {name}: CA in {ca.dir} (ca.key mode 0600; keep it off the nodes)\n"
               f"members need {ca.dir / 'ca.crt'}; config {ca.dir / 'group.toml'}")


@group_cmd.command("issue")
@click.argument("node", type=click.Path(exists=True, path_type=Path))
@click.option("--group", "name", required=True, help="group name")
@_groups_opt
@click.option("--days", default=365, show_default=True, type=click.IntRange(1, 3650))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="bundle file to write (default <node id>.<group>.bundle.pem)")
def group_issue(node: Path, name: str, groups: Path, days: int, out: Path | None) -> None:
    """Sign a node certificate. NODE is the node's request (node.csr) or, on the same machine,
    its identity directory: then the certificate is installed there directly."""
    ca = GroupCA.load(groups / name)
    csr_path = node / "node.csr" if node.is_dir() else node
    try:
        csr = x509.load_pem_x509_csr(read_file(csr_path, "node request"))
    except ValueError as e:
        raise IdentityError(f"{csr_path}: not a certificate request ({e})") from None
    cert = ca.issue(csr, days=days)
    bundle = ca.bundle(cert)
    nid = node_id_of(cert.subject)
    if node.is_dir() and out is None:
        NodeIdentity.load(node).install(bundle)
        click.echo(f"issued serial {cert.serial_number:x} to node {nid}; installed in {node}")
        return
    out = out or Path(f"{nid}.{name}.bundle.pem")
    out.write_bytes(bundle)
    click.echo(f"issued serial {cert.serial_number:x} to node {nid}; bundle {out} -> 'ipop-switch group join {out.name}'")


@group_cmd.command("join")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_dir_opt
@click.option("--new-ca", is_flag=True, help="accept a CA other than the one trusted for this group so far "
                                             "(the group's CA was replaced)")
def group_join(bundle: Path, dir_: Path, new_ca: bool) -> None:
    """Install a bundle made by 'group issue' (node cert, CA cert, CRL) after checking it.
    The group's CA is pinned at the first join; an older CRL than the installed one is refused."""
    ident = NodeIdentity.load(dir_)
    overlay = ident.install(bundle.read_bytes(), new_ca=new_ca)
    click.echo(f"node {ident.node_id} is a member of {overlay} ({ident.group_dir(overlay)})")


@group_cmd.command("revoke")
@click.argument("name")
@click.argument("node")
@_groups_opt
def group_revoke(name: str, node: str, groups: Path) -> None:
    """Revoke NODE (node id or certificate serial in hex) in group NAME and rewrite its CRL."""
    ca = GroupCA.load(groups / name)
    serials = ca.revoke(node)
    click.echo(f"revoked {', '.join(f'{s:x}' for s in serials)}; distribute {ca.dir / 'crl.pem'} to every member's "
               f"groups/{name}/crl.pem (nodes re-read it when it changes)")


COMMANDS = [init_cmd, whoami_cmd, group_cmd]
