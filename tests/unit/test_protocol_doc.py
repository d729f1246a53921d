"""docs/protocol.md is the protocol's specification: it must not fall behind bento/protocol.py.

These tests read the request table and the value sets of bento.protocol at run
time, so an op, a field, an error code, a state, a signal, a buffer policy or a
limit key added to the code without its description in the spec fails here.
They check presence where a reader looks for it (an op's own section, a row
of the right table), not the prose around it. They check one direction only:
the spec may already describe what a branch adds before it is merged.
"""

from __future__ import annotations

import pathlib
import re

import pytest

from bento import protocol

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPEC = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")


def sections(level: int) -> dict[str, str]:
    """Heading text of this level -> the text under it, up to the next heading of any level."""
    out: dict[str, str] = {}
    heads = list(re.finditer(r"^(#+) (.+)$", SPEC, re.M))
    for head, nxt in zip(heads, heads[1:] + [None], strict=True):
        if len(head.group(1)) == level:
            end = nxt.start() if nxt is not None else len(SPEC)
            out.setdefault(head.group(2).strip(), SPEC[head.end():end])
    return out


def table_keys(text: str) -> set[str]:
    """The names that open the first cells of a section's table rows (in backquotes)."""
    return set(re.findall(r"^\| `([^`]+)`", text, re.M))


OPS = protocol._OPS  # the request table parse_request validates with
H2 = sections(2)
H3 = sections(3)


def test_the_sections_this_test_reads_exist():
    for name in ("Ops", "Error codes", "States", "Limits", "Events"):
        assert name in H2, f"docs/protocol.md has no '## {name}' section"
    assert table_keys(H2["Ops"]) >= {"hello", "execute"}


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_has_a_row_and_a_section(op):
    assert op in table_keys(H2["Ops"]), f"op {op!r} has no row in the '## Ops' table"
    assert op in H3, f"op {op!r} has no '### {op}' section"


@pytest.mark.parametrize(("op", "field"), sorted((op, f) for op, spec in OPS.items() for f in spec[1]))
def test_every_field_is_described_in_its_op_section(op, field):
    section = H3.get(op, "")
    assert f"`{field}`" in section, f"field {field!r} of op {op!r} is not in its '### {op}' section"


def test_every_error_code_has_a_row():
    rows = table_keys(H2["Error codes"])
    assert set(protocol.ERROR_CODES) <= rows, f"missing: {sorted(set(protocol.ERROR_CODES) - rows)}"


def test_every_state_has_a_row():
    assert set(protocol.STATES) <= table_keys(H2["States"])


def test_every_limit_key_has_a_row():
    assert set(protocol.LIMIT_KEYS) <= table_keys(H2["Limits"])


def test_every_buffer_policy_has_a_row():
    assert set(protocol.BUFFER_POLICIES) <= table_keys(H3["Acknowledgements and the buffer"])


def test_every_signal_is_named_in_the_signal_section():
    for sig in protocol.SIGNALS:
        assert f'"{sig}"' in H3["signal"], f"signal {sig!r} is not in '### signal'"


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading (before de-duplication)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_inside_the_spec_lands_on_a_heading():
    anchors: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", SPEC, re.M):
        base = slug(heading)
        anchor, n = base, 0
        while anchor in anchors:
            n += 1
            anchor = f"{base}-{n}"
        anchors.add(anchor)
    links = set(re.findall(r"\]\(#([^)]+)\)", SPEC))
    assert links, "no internal links found: the pattern is wrong"
    assert links <= anchors, f"links to no heading: {sorted(links - anchors)}"


def test_no_doc_points_outside_the_repository():
    # A clone has no ../shared: the spec must be whole in the repository.
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        assert "../shared" not in path.read_text(encoding="utf-8"), f"{path.name} links ../shared"
