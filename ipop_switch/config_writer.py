"""Writes a node's TOML config: the one writer used by ``ipop-switch init`` (the starter
config), ``ipop-switch deploy`` and the lab.

A config is given as the dict ``load_config`` would read (``node``, ``ovs``, a list of
``overlay`` tables with their ``xmpp`` and ``ice`` tables). The text is checked against
the schema before it is written, so no writer can produce a config that ``up`` refuses.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from .config import Config, ConfigError

# the order tables appear in; keys of a table keep the order they are given in
_TABLES = ("node", "ovs")
_SUBTABLES = ("xmpp", "ice", "dns", "topology", "social")


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, Path):
        v = str(v)
    if isinstance(v, str):
        return json.dumps(v)          # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to a node config")


def _is_table_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, dict) for x in v)


def _lines(table: dict, where: str, comments: dict[str, str]) -> list[str]:
    out = []
    for key, v in table.items():
        if v is None or isinstance(v, dict) or _is_table_list(v):
            continue
        line = f"{key} = {_value(v)}"
        note = comments.get(f"{where}.{key}")
        out.append(f"{line:<34} # {note}" if note else line)
    return out


def render_config(doc: dict, *, header: str, comments: dict[str, str] | None = None) -> str:
    """The TOML text of ``doc``. ``comments`` maps dotted keys (``node.metrics``,
    ``overlay.name``, ``overlay.xmpp.ca_file``) to a note written after the value."""
    comments = comments or {}
    out = [f"# {line}" if line else "#" for line in header.splitlines()]
    for name in _TABLES:
        if doc.get(name):
            out += ["", f"[{name}]", *_lines(doc[name], name, comments)]
            for key, v in doc[name].items():             # [node.web]
                if isinstance(v, dict) and v:
                    out += ["", f"[{name}.{key}]", *_lines(v, f"{name}.{key}", comments)]
    for ov in doc.get("overlay", []):
        head = "[[overlay]]"
        if comments.get("overlay"):
            head = f"{head:<34} # {comments['overlay']}"
        out += ["", head, *_lines(ov, "overlay", comments)]
        for sub in _SUBTABLES:
            if ov.get(sub):
                out += ["", f"[overlay.{sub}]", *_lines(ov[sub], f"overlay.{sub}", comments)]
                for key, v in ov[sub].items():   # a map of free keys ([overlay.social.addresses]): quoted
                    if isinstance(v, dict) and v:
                        out += ["", f"[overlay.{sub}.{key}]", *(f"{json.dumps(k)} = {_value(x)}" for k, x in v.items())]
        for guest in ov.get("attach") or []:          # [[overlay.attach]]: after the subtables
            out += ["", "[[overlay.attach]]", *_lines(guest, "overlay.attach", comments)]
    text = "\n".join(out) + "\n"
    try:
        Config.parse(tomllib.loads(text))
    except ConfigError as e:
        raise ConfigError(f"refusing to write an invalid node config: {e}") from None
    return text


def write_config(path: Path, doc: dict, *, header: str, comments: dict[str, str] | None = None,
                 overwrite: bool = True) -> bool:
    """Write ``doc`` to ``path`` (0600: it holds passwords); False if it exists and not ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        return False
    text = render_config(doc, header=header, comments=comments)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)
    return True
