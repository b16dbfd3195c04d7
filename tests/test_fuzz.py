"""The coverage-guided fuzzer (fuzz/decoders.py) run on every decoder for a bounded time: a crash, a hang or
an unexpected exception type found by libFuzzer fails the test, with the input that caused it.

``FEDMQTT_FUZZ_SECONDS`` is the fuzzing time shared by all targets (27 s by default: 3 s each; 600 to look harder)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz" / "decoders.py"
TARGETS = ("codec", "update", "compressed", "model", "model_file", "status", "assignment", "secagg_in", "secagg_out")
SECONDS = float(os.environ.get("FEDMQTT_FUZZ_SECONDS", "27"))

pytestmark = pytest.mark.fuzz


def _atheris() -> None:
    if importlib.util.find_spec("atheris") is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but atheris is not installed (pip install -e '.[test]')", pytrace=False)
        pytest.skip("atheris is not installed")


def _run(*args: str, timeout: float, tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(tmp)} if tmp is not None else None  # its seed corpus and scratch files
    return subprocess.run([sys.executable, str(FUZZ), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=FUZZ.parent, env=env)


def test_the_targets_are_the_ones_fuzzed_here(tmp_path: Path) -> None:
    _atheris()
    listed = _run("list", timeout=120, tmp=tmp_path)  # importing the targets makes a scratch directory
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert tuple(listed.stdout.split()) == TARGETS


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_finds_no_crash(target: str, tmp_path: Path) -> None:
    _atheris()
    seconds = max(1, round(SECONDS / len(TARGETS)))
    out = _run(target, f"-max_total_time={seconds}", f"-artifact_prefix={tmp_path}/", "-timeout=20",
               "-rss_limit_mb=4096", "-print_final_stats=1", timeout=seconds + 240, tmp=tmp_path)
    found = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    for name in found:
        print(f"{name}: {(tmp_path / name).read_bytes()[:2000]!r}")
    assert out.returncode == 0 and not found, f"{target}: exit {out.returncode}, {found}\n{out.stderr[-6000:]}"
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", out.stderr)
    assert runs is not None and int(runs.group(1)) > 100, f"{target} hardly ran:\n{out.stderr[-3000:]}"


def test_a_crash_fails_the_run_and_leaves_its_input(tmp_path: Path) -> None:
    _atheris()
    out = _run("canary", "-max_total_time=5", f"-artifact_prefix={tmp_path}/", timeout=240, tmp=tmp_path)
    crashes = [p for p in tmp_path.iterdir() if p.name.startswith("crash-")]
    assert out.returncode != 0 and "the canary crashed" in out.stdout + out.stderr
    assert [p.read_bytes() for p in crashes] == [b"crash"]
