"""`ipop-switch bench --fuzz`: the C fast path built with ASan/UBSan and fuzzed by
libFuzzer (ipop_switch/bench/fuzz.py, harness ipop_switch/tunnel/fuzz_fastpath.c), here
for 15 s on the corpus kept in the repository: it must build, execute inputs and find
no crash. Longer runs (ten minutes and more) are the bench's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fuzz_corpus" / "fastpath"


def test_the_corpus_is_in_the_repository_and_small():
    files = [p for p in CORPUS.iterdir() if p.is_file()]
    assert len(files) >= 5, "the fuzz corpus is missing (ipop-switch bench --fuzz N --update makes it)"
    assert sum(p.stat().st_size for p in files) < 1 << 20


@pytest.mark.skipif(not shutil.which("clang"), reason="clang is not installed (apt-get install clang libclang-rt-14-dev)")
def test_a_short_sanitized_fuzz_run_executes_inputs_and_finds_no_crash(tmp_path):
    before = sorted(p.name for p in CORPUS.iterdir())
    out = tmp_path / "fuzz.json"
    r = subprocess.run([sys.executable, "-m", "ipop_switch.cli", "bench", "--fuzz", "0.25", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, f"bench --fuzz failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert report["crashes"] == 0 and not report["crash_inputs"]
    assert report["executions"] > 1000, report
    assert report["exec_per_sec"] > 0 and report["sanitizers"] == "address,undefined,leak"
    assert report["corpus_files"] == len(before)
    assert sorted(p.name for p in CORPUS.iterdir()) == before, "without --update the corpus stays as it is"
    assert "executions" in r.stdout and "crashes 0" in r.stdout
