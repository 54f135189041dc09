"""README.md's status table and the tests are tied: every claim names tests (tests/status_claims.py) that exist."""

import os
import subprocess
import sys
from pathlib import Path

from tests.status_claims import CLAIMS, COLUMNS

ROOT = Path(__file__).resolve().parents[2]
HEADING = "## Status: what works today"


def status_table(readme: str):
    """``(columns, rows)`` of the first table under the status heading: ``rows`` is ``[(feature, {column: cell})]``."""
    lines = readme.split(HEADING, 1)[1].splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("|")):]
    table = table[:next((i for i, line in enumerate(table) if not line.startswith("|")), len(table))]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]
    header, body = cells[0], cells[2:]
    for row in body:
        assert len(row) == len(header), f"README status row {row[0]!r}: {len(row)} cells, the header has {len(header)}"
    return header[1:], [(row[0], dict(zip(header[1:], row[1:]))) for row in body]


def claims(cell: str) -> bool:
    """Whether a cell claims something: anything but '-', a 'no...' or an 'untested'."""
    return cell not in ("", "-") and not cell.startswith("no") and "untested" not in cell


def cited_tests(readme: str):
    """``{node id: [(feature, column)]}`` for every claiming cell, and the problems found on the way."""
    columns, rows = status_table(readme)
    cited, problems = {}, []
    for feature, row in rows:
        keys = [key for key in CLAIMS if feature.startswith(key)]
        if len(keys) != 1:
            problems.append(f"row {feature!r}: {len(keys)} entries of tests/status_claims.py match it, want 1")
            continue
        mapping = CLAIMS[keys[0]]
        for column in columns:
            if column not in COLUMNS or not claims(row[column]):
                continue
            ids = mapping.get(column, mapping.get("*", []))
            if not ids:
                problems.append(f"row {feature!r}, column {column} says {row[column]!r} and names no test")
            for node in ids:
                cited.setdefault(node.format(s=COLUMNS[column]), []).append((feature, column))
    return cited, problems


def collected(files):
    """The node ids pytest collects from ``files`` (collection only: nothing runs)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                         cwd=ROOT,
                         env={
                             **os.environ, "PYTHONPATH": str(ROOT)
                         },
                         capture_output=True,
                         text=True,
                         timeout=600)
    return {line.strip() for line in out.stdout.splitlines() if "::" in line}, out


def test_the_status_table_has_every_schedule_and_says_how_each_row_is_shown():
    columns, rows = status_table((ROOT / "README.md").read_text())
    assert columns == [*COLUMNS, "shown by"], columns
    for feature, row in rows:
        assert row["shown by"] and "GPU" not in row["shown by"], (feature, row["shown by"])  # nothing ran on one yet


def test_every_claim_of_the_status_table_names_tests_that_pytest_collects():
    cited, problems = cited_tests((ROOT / "README.md").read_text())
    assert not problems, "\n".join(problems)
    ids, out = collected(sorted({node.split("::")[0] for node in cited}))
    missing = {node: cells for node, cells in cited.items() if node not in ids}
    assert not missing, "tests/status_claims.py names tests pytest does not collect:\n" + "\n".join(
        f"  {node} (for {cells})" for node, cells in sorted(missing.items())) + f"\n{out.stderr[-2000:]}"


def names_tests_for(feature, column):
    """Whether tests/status_claims.py names tests for ``column`` of the row ``feature`` (itself or by "*")."""
    return any(key in CLAIMS[k] for k in CLAIMS if feature.startswith(k) for key in (column, "*"))


def test_a_claim_without_tests_is_found():
    readme = (ROOT / "README.md").read_text()
    columns, rows = status_table(readme)
    # planted: a cell that claims nothing, in a row that names no tests for its column, now says "yes"
    unmapped = [(f, c) for f, row in rows for c in COLUMNS if not claims(row[c]) and not names_tests_for(f, c)]
    feature, column = unmapped[0]
    line = next(line for line in readme.splitlines() if line.startswith(f"| {feature} |"))
    cells = line.strip().strip("|").split("|")
    cells[1 + columns.index(column)] = " yes "
    _, problems = cited_tests(readme.replace(line, "|" + "|".join(cells) + "|", 1))
    assert problems == [f"row {feature!r}, column {column} says 'yes' and names no test"], problems
