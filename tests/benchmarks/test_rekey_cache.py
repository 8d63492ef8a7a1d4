"""benchmarks/rekey_cache.py moves a cached accuracy row to its new key only where its recipe and
settings are the same in both trees, and says so in the row."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def rekey_cache():
    import rekey_cache  # benchmarks/ is on sys.path (tests/conftest.py)

    return rekey_cache


def _tree(tag: str, recipes: dict) -> SimpleNamespace:
    """A stand-in for one tree's accuracy.py: keys differ between trees, recipes as given."""
    method = SimpleNamespace(match_time_of=None)
    return SimpleNamespace(ALL={name: method for name in recipes}, settings_of=lambda args: {"windows": 10},
                           edited_recipe=lambda name, settings: recipes[name],
                           cache_key=lambda name, settings, recipe: f"{tag}{len(json.dumps(recipe))}")


def test_rows_move_to_their_new_key_with_the_reason_and_changed_recipes_stay(rekey_cache, tmp_path):
    old = _tree("old", {"gsq3": {"steps": 60}, "gsq2": {"steps": 150}, "gptq3": {}})
    new = _tree("new", {"gsq3": {"steps": 60}, "gsq2": {"steps": 200}, "gptq3": {}})
    for name, recipe in (("gsq3", {"steps": 60}), ("gsq2", {"steps": 150})):
        (tmp_path / f"{name}-{old.cache_key(name, None, recipe)}.json").write_text(json.dumps({"ce": 3.2, "provenance": "x"}))
    report = rekey_cache.rekey(old, new, tmp_path, "because")
    moved = json.loads((tmp_path / f"gsq3-{new.cache_key('gsq3', None, {'steps': 60})}.json").read_text())
    assert moved == {"ce": 3.2, "provenance": "x; because"}
    assert not (tmp_path / f"gsq3-{old.cache_key('gsq3', None, {'steps': 60})}.json").exists()
    assert (tmp_path / f"gsq2-{old.cache_key('gsq2', None, {'steps': 150})}.json").exists()  # left for a rerun
    assert any(line.startswith("gsq2: NOT carried over") for line in report)
