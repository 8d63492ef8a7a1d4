"""The README's results tables are what the committed results files say (never edited by hand)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tables_match_the_results_files():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "readme_tables.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_row_over_seeds_shows_its_mean_and_half_the_seeds_range():
    import readme_tables  # benchmarks/ is on sys.path (tests/conftest.py)

    row = {"ppl": 26.0, "seeds": {"0": {"ppl": 25.5}, "1": {"ppl": 26.5}}}
    assert readme_tables._ppl(row) == "26.00 ±0.50 (2 seeds)"
    assert readme_tables._ppl({"ppl": 26.0}) == "26.00"
