"""The README is the front door and docs/ holds the long form: setup commands, configuration table, error and metric
tables must stay true, and every relative link must lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
SERVING = (DOCS / "serving.md").read_text()  # the configuration, error and metric tables


def test_the_configuration_table_is_the_one_settings_generates():
    from service.settings import markdown_table

    assert markdown_table() in SERVING, "docs/serving.md's configuration table: paste `python -m service.settings`"
    for name in Settings.model_fields:  # and the generator covers every field
        assert f"| `VITSERVE_{name.upper()}` |" in markdown_table()


def test_vitserve_serve_has_an_option_for_every_setting():
    from service.cli import build_parser

    options = {o for action in build_parser()._actions for o in action.option_strings}
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in options, name


def test_the_two_setup_commands_exist_and_ci_runs_the_test_one():
    assert "make serve" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_error_table_matches_the_error_map():
    from service.errors import ERROR_TABLE

    for cls, (status, code) in ERROR_TABLE.items():
        row = next((l for l in SERVING.splitlines() if f"`{cls.type}`" in l and l.startswith("|")), None)
        assert row is not None, f"{cls.type} missing from docs/serving.md's error table"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert str(status) in cells[0].split(" / ") and code in cells[1].split(" / "), (cls.type, status, code, row)


def test_metric_table_lists_every_exported_metric():
    from service import metrics

    for m in vars(metrics).values():
        if hasattr(m, "_name"):
            shown = m._name + ("_total" if type(m).__name__ == "Counter" else "")
            assert f"`{shown}`" in SERVING, shown


def github_anchor(heading: str) -> str:
    """GitHub's rule: markup dropped, lower-case, punctuation other than '-' and '_' dropped, spaces become '-'."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in without_code_blocks(path.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            base = github_anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_readme_is_short_and_every_relative_link_resolves():
    assert len(README.splitlines()) < 250, "README.md is the front door: move long-form material into docs/"
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    assert len(pages) > 1, "docs/ holds the long-form pages"
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`\n]*`", "", without_code_blocks(page.read_text()))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            assert dest.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
            if anchor:
                assert dest.suffix == ".md", (page, target)
                assert anchor in anchors(dest), f"{page.relative_to(ROOT)} links to {target}: no such heading"
            checked += 1
    assert checked >= len(pages)
    linked = set(re.findall(r"\]\(docs/([^)#]+)", README))
    assert {p.name for p in DOCS.glob("*.md")} <= linked, "every docs page is linked from the README"
