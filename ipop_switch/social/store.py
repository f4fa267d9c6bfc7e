"""Small JSON state files written atomically: a crash leaves the old file or the new, never half."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ipop_switch.errors import IpopError


class SocialStateError(IpopError):
    """A social state file that cannot be read or is not what we wrote."""


def load_json(path: Path, what: str) -> dict[str, Any] | None:
    """The file's object, None if it does not exist; a clear error if it is not ours."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SocialStateError(f"{what} {path}: unreadable ({e}); move it away to start afresh") from None
    if not isinstance(data, dict):
        raise SocialStateError(f"{what} {path}: not a JSON object; move it away to start afresh")
    return data


def save_json(path: Path, obj: dict[str, Any]) -> None:
    """Temp file + fsync + rename (0600: the pins decide whom we trust)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
