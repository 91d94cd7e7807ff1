"""A bounded coverage-guided fuzzing run (atheris) over the OTLP decoders, every log format parser and the
config parsers; docs/reliability.md says how to run it longer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).parent / "fuzz" / "fuzz_inputs.py"


def test_fuzzing_the_input_decoders_finds_no_crash_hang_or_blow_up(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris has no wheel for this Python or platform")
    proc = subprocess.run([sys.executable, str(HARNESS), "-max_total_time=15", "-runs=200000", "-timeout=10",
                           "-rss_limit_mb=2048", "-print_final_stats=1", f"-artifact_prefix={tmp_path}/"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)
    assert runs and int(runs.group(1)) >= 1000, proc.stderr[-1000:]  # it really ran
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))
