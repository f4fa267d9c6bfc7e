"""``ipop-switch bench --fuzz MINUTES``: the datapath's C loops under libFuzzer with
AddressSanitizer (leaks included) and UndefinedBehaviorSanitizer.

Why libFuzzer with an embedded interpreter, not atheris: ``_fastpath.c`` is a CPython
extension, and what must be instrumented is that C, not Python. The harness
(``ipop_switch/tunnel/fuzz_fastpath.c``) includes the extension's source, registers it as a
built-in module of an embedded Python and calls its methods as ``tunnel/receive.py`` and
``tunnel/send.py`` do, so one clang command builds everything with
``-fsanitize=address,undefined,fuzzer`` and no sanitizer runtime has to be preloaded into
a stock ``python``. The harness seals the fuzzer's plaintexts with the session key, so
the fuzzer reaches everything behind the AEAD tag (see the harness's comment for the
input layout).

Needs clang with its sanitizer and libFuzzer runtimes (Debian 12:
``apt-get install clang libclang-rt-14-dev``), libssl-dev and the shared libpython of the
interpreter running this; the command says which is missing. The corpus lives in
``tests/fuzz_corpus/fastpath/`` (seeds included, kept small by ``-merge=1``); new inputs go
there only with ``--update``. A crashing input is kept in ``tests/fuzz_corpus/crashes/``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

from ..errors import IpopError

ROOT = Path(__file__).resolve().parents[2]
TUNNEL = ROOT / "ipop_switch" / "tunnel"
SOURCES = (TUNNEL / "_fastpath.c", TUNNEL / "fuzz_fastpath.c", TUNNEL / "_recvmany.h")
CORPUS = ROOT / "tests" / "fuzz_corpus" / "fastpath"
CRASHES = ROOT / "tests" / "fuzz_corpus" / "crashes"
MAX_LEN = 8192              # records are headers + a filler length: ~140 segments fit
FLAGS = ["-g", "-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined,fuzzer",
         "-fno-sanitize-recover=undefined", "-Wall", "-Wno-missing-field-initializers"]
# LeakSanitizer on: with Python's allocator switched to malloc (the harness), a reference
# the C code forgets to drop is an unreachable block, reported for the input that leaked it.
SAN_ENV = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1:symbolize=1",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
ARTIFACTS = ("crash-", "leak-", "timeout-", "oom-", "slow-unit-")


def missing_toolchain() -> str | None:
    """What is missing to build the harness, as advice; None when all is there."""
    if not shutil.which("clang"):
        return "clang is not installed (Debian: apt-get install clang libclang-rt-14-dev)"
    inc = Path(sysconfig.get_config_var("INCLUDEPY") or "")
    if not (inc / "Python.h").exists():
        return f"Python's headers are missing ({inc}/Python.h; Debian: apt-get install python3-dev)"
    if not Path("/usr/include/openssl/evp.h").exists() and not list(Path("/usr/include").glob("*/openssl/evp.h")):
        return "OpenSSL's headers are missing (Debian: apt-get install libssl-dev)"
    if not _libpython():
        return "no libpython for this interpreter to embed (build Python with --enable-shared)"
    return None


def _libpython() -> Path | None:
    libdir, ver = Path(sysconfig.get_config_var("LIBDIR") or ""), sysconfig.get_config_var("LDVERSION")
    for name in (f"libpython{ver}.so", f"libpython{ver}.a"):
        if (libdir / name).exists():
            return libdir / name
    return None


def build(cache: Path | None = None) -> Path:
    """The instrumented harness, rebuilt when a source or the flags change."""
    why = missing_toolchain()
    if why:
        raise IpopError(f"bench --fuzz: {why}")
    h = hashlib.sha1(" ".join(FLAGS).encode())
    for src in SOURCES:
        h.update(src.read_bytes())
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ipop-switch" / "fuzz"
    exe = cache / h.hexdigest()[:12] / "fuzz_fastpath"
    if exe.exists():
        return exe
    exe.parent.mkdir(parents=True, exist_ok=True)
    libdir, ver = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDVERSION")
    cmd = ["clang", *FLAGS, f"-I{sysconfig.get_config_var('INCLUDEPY')}", f"-I{TUNNEL}",
           str(SOURCES[1]), "-o", str(exe), f"-L{libdir}", f"-Wl,-rpath,{libdir}", f"-lpython{ver}",
           "-lcrypto", "-ldl", "-lm", "-lpthread", "-lutil"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        hint = (" (the sanitizer/libFuzzer runtimes: apt-get install libclang-rt-14-dev)"
                if "clang_rt" in r.stderr or "libFuzzer" in r.stderr else "")
        raise IpopError(f"bench --fuzz: building the harness failed{hint}:\n{r.stderr[-2000:]}")
    return exe


# -- seeds: realistic inputs in the harness's layout, so the fuzzer starts inside runs ------

def _tcp_v4(seq: int, payload: bytes, ident: int, flags: int = 0x10) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 5 << 4, flags, 502, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), ident, 0x4000, 64, 6, 0,
                     bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2]))
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp + payload


def _tcp_v6(seq: int, payload: bytes, flags: int = 0x10) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 5 << 4, flags, 502, 0, 0)
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp) + len(payload), 6, 64,
                     b"\xfd" + b"\x00" * 14 + b"\x01", b"\xfd" + b"\x00" * 14 + b"\x02")
    return b"\x02" * 6 + b"\x04" * 6 + b"\x86\xdd" + ip + tcp + payload


def _rec(ctl: int, frame: bytes) -> bytes:
    """A record of the harness: the frame's headers, and its payload as a filler length."""
    hlen = 54 if frame[12:14] == b"\x08\x00" else 74
    return struct.pack("!BBH", ctl, min(hlen, len(frame)), max(0, len(frame) - hlen)) + frame[:hlen]


def seeds() -> dict[str, bytes]:
    """Named seed inputs: TCP bursts (IPv4, IPv6, marked continuations, a forgery, a
    replay, two sessions, a run up to the 64 KiB limit), a seal_tcp call, a window walk."""
    mss = 1400
    pay = bytes(range(256)) * 6
    v4 = [_tcp_v4(1000 + i * mss, pay[:mss], 7 + i) for i in range(6)]
    v6 = [_tcp_v6(5000 + i * 1200, pay[:1200]) for i in range(4)]
    out = {
        "seed-v4-burst": b"\x00" + b"".join(_rec(0x00, f) for f in v4),
        "seed-v4-cont": b"\x01" + _rec(0x00, v4[0]) + b"".join(_rec(0x01, f) for f in v4[1:]),
        "seed-v6-burst": b"\x02" + b"".join(_rec(0x00, f) for f in v6),
        "seed-forged-replay": (b"\x03" + _rec(0, v4[0]) + _rec(0x10, v4[1]) + _rec(0, v4[2])
                               + _rec(0x04, v4[2]) + _rec(0x20, v4[3]) + _rec(0x40, v4[4])),
        "seed-two-sessions": (b"\x04" + b"".join(_rec(0, f) for f in v4[:3])
                              + _rec(0x80 | 0x04, v6[0]) + b"".join(_rec(0, f) for f in v6[1:])),
        "seed-psh-ack": (b"\x05" + _rec(0, v4[0]) + _rec(0, _tcp_v4(1000 + mss, pay[:mss], 8, 0x18))
                         + _rec(0, _tcp_v4(1000 + 2 * mss, b"", 9)) + _rec(0x03, v4[3])),
        "seed-full-run": b"\x00" + b"".join(
            _rec(0x01 if i else 0, _tcp_v4(i * mss, pay[:mss], i)) for i in range(48)),
    }
    frame = _tcp_v4(1, (pay * 3)[:4000], 1)
    out["seed-seal"] = (b"\x06" + bytes([54, 34]) + struct.pack("!H", mss) + bytes([0, 3])
                        + struct.pack("!Q", 99) + struct.pack("!H", 1200) + frame)
    out["seed-window"] = b"\x07" + struct.pack("!H", 2048) + b"".join(
        struct.pack("!Q", c) for c in (1, 2, 2, 5000, 3000, 2999, 1, 7000, 4953, 4952))
    return out


def write_seeds(corpus: Path) -> int:
    corpus.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (corpus / name).write_bytes(data)
    return len(seeds())


def corpus_size(corpus: Path) -> tuple[int, int]:
    """(inputs, bytes) of the corpus directory."""
    sizes = []
    for p in corpus.iterdir() if corpus.is_dir() else ():
        try:
            sizes.append(p.stat().st_size)
        except OSError:             # removed meanwhile (another run's merge)
            pass
    return len(sizes), sum(sizes)


def _stat(text: str, name: str) -> int:
    m = re.findall(rf"stat::{name}:\s+(\d+)", text)
    return int(m[-1]) if m else 0


def run_fuzz(minutes: float, *, update: bool = False, corpus: Path = CORPUS, crashes: Path = CRASHES,
             console=None) -> dict:
    """Fuzz for ``minutes`` (wall clock, one process). New inputs land in a scratch
    directory, or with ``update`` in the corpus, which is then minimised (-merge=1).
    Returns the figures; ``crashes`` > 0 means an input is kept in ``crashes``."""
    say = _say(console)
    exe = build()
    if not corpus.is_dir() or not any(corpus.iterdir()):
        write_seeds(corpus)
    crashes.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in crashes.iterdir()}
    seconds = max(1, round(minutes * 60))
    env = {**os.environ, **SAN_ENV}
    with tempfile.TemporaryDirectory(prefix="ipsw-fuzz-") as scratch:
        dirs = [str(corpus)] if update else [scratch, str(corpus)]
        say(f"fuzzing the C fast path for {seconds} s ({exe}) ...")
        t0 = time.monotonic()
        r = subprocess.run([str(exe), f"-max_total_time={seconds}", f"-max_len={MAX_LEN}",
                            "-print_final_stats=1", "-timeout=10", "-rss_limit_mb=2048",
                            f"-artifact_prefix={crashes}/", *dirs],
                           capture_output=True, text=True, env=env, timeout=seconds + 600)
        elapsed = time.monotonic() - t0
        log = r.stderr
        new = sorted(p.name for p in crashes.iterdir() if p.name not in before and p.name.startswith(ARTIFACTS))
        if r.returncode or new:         # the whole log beside the input, for the bug report
            (crashes / f"{new[0] if new else 'fuzz'}.log").write_text(log)
            tail = "\n".join(log.splitlines()[-60:])
            say(f"the fuzzer stopped with exit status {r.returncode}\n{tail}")
        if update and not r.returncode:
            _minimise(exe, corpus, env)
    files, size = corpus_size(corpus)
    execs = _stat(log, "number_of_executed_units")
    report = {
        "minutes": round(elapsed / 60, 2), "executions": execs,
        "exec_per_sec": round(execs / elapsed) if elapsed else 0,
        "crashes": max(len(new), 1 if r.returncode else 0),
        "crash_inputs": [str(crashes / n) for n in new],
        "corpus_files": files, "corpus_bytes": size, "new_units": _stat(log, "new_units_added"),
        "peak_rss_mb": _stat(log, "peak_rss_mb"), "exit_status": r.returncode,
        "sanitizers": "address,undefined,leak", "harness": str(SOURCES[1]), "binary": str(exe),
    }
    return report


def _minimise(exe: Path, corpus: Path, env: dict) -> None:
    """Replace the corpus by the smallest set with the same coverage (libFuzzer -merge=1)."""
    with tempfile.TemporaryDirectory(prefix="ipsw-fuzz-merge-") as tmp:
        r = subprocess.run([str(exe), "-merge=1", f"-max_len={MAX_LEN}", tmp, str(corpus)],
                           capture_output=True, text=True, env=env, timeout=1800)
        kept = list(Path(tmp).iterdir())
        if r.returncode or not kept:
            return
        for p in corpus.iterdir():
            p.unlink()
        for p in kept:
            shutil.copy2(p, corpus / p.name)


def _say(console):
    """Print plainly (no rich markup: the fuzzer's log has brackets)."""
    return (lambda text: console.print(text, markup=False, highlight=False)) if console else print


def print_report(report: dict, console=None) -> None:
    say = _say(console)
    say(f"fuzz (ASan+LSan+UBSan, libFuzzer): {report['executions']} executions in {report['minutes']} min, "
        f"{report['exec_per_sec']} exec/s, crashes {report['crashes']}, "
        f"corpus {report['corpus_files']} inputs / {report['corpus_bytes']} bytes")
    for p in report["crash_inputs"]:
        say(f"  crashing input kept: {p} (replay: {' '.join(f'{k}={v}' for k, v in SAN_ENV.items())} "
            f"{report['binary']} {p})")
