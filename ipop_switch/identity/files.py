"""Writing key and certificate files: private ones are 0600 from birth, never overwritten by surprise."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from .certs import IdentityError


def write_file(path: Path, data: bytes, *, private: bool, overwrite: bool = True) -> None:
    """Write atomically (temp file + rename); a private file is created with mode 0600 so the
    key never exists on disk with wider permissions, even for a moment."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise IdentityError(f"{path} exists; refusing to overwrite it (use --force)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600 if private else 0o644)  # the umask may have narrowed a public one
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{what} not found: {path}") from None
    except PermissionError:
        raise IdentityError(f"{what} not readable: {path} (permission denied)") from None


def private_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private(path: Path, what: str, kind: type):
    data = read_file(path, what)
    mode = Path(path).stat().st_mode & 0o777
    if mode & 0o077:
        raise IdentityError(f"{what} {path} has mode {mode:o}: readable by others; chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise IdentityError(f"{what} {path}: not a usable private key ({e})") from None
    if not isinstance(key, kind):
        raise IdentityError(f"{what} {path}: wrong key type {type(key).__name__}")
    return key
