"""The README is the front door: its setup commands, configuration table and CLI mentions must stay true."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented_with_its_default():
    for name, field in Settings.model_fields.items():
        row = next((l for l in README.splitlines() if l.startswith(f"| `VITSERVE_{name.upper()}`")), None)
        assert row is not None, f"VITSERVE_{name.upper()} missing from the README's configuration table"
        default = field.default_factory() if field.default_factory else field.default
        if name != "artifact":
            assert f"`{default}`" in row, (name, default, row)


def test_the_two_setup_commands_exist_and_ci_runs_the_test_one():
    assert "make serve" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_error_table_matches_the_error_map():
    from service.errors import ERROR_TABLE

    for cls, (status, code) in ERROR_TABLE.items():
        row = next((l for l in README.splitlines() if f"`{cls.type}`" in l and l.startswith("|")), None)
        assert row is not None, f"{cls.type} missing from the README's error table"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert str(status) in cells[0].split(" / ") and code in cells[1].split(" / "), (cls.type, status, code, row)


def test_metric_table_lists_every_exported_metric():
    from service import metrics

    for m in vars(metrics).values():
        if hasattr(m, "_name"):
            shown = m._name + ("_total" if type(m).__name__ == "Counter" else "")
            assert f"`{shown}`" in README, shown
