"""Errors a user sees as one clear line (the CLI prints ``str(err)``, no traceback)."""


class IpopError(Exception):
    """Base of every error meant for the user: the message says what and what to do."""


class CommandError(IpopError):
    """An external command (ip, nft, ovs-vsctl, ...) failed."""

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr.strip()
        lines = [l for l in self.stderr.splitlines() if l.strip()]
        errs = [l for l in lines if "rror" in l]
        last = (errs or lines or [f"exit status {returncode}"])[0 if errs else -1]
        super().__init__(f"{' '.join(argv[:4])}{' ...' if len(argv) > 4 else ''}: {last}")
