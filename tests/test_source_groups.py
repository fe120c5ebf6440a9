"""Tests of the source → source-group rules (docs/database.md#source-group-classification)."""

from __future__ import annotations

import pytest

from modules.SQLModule.source_groups import SOURCE_GROUPS, classify, source_name

# The test table of docs/database.md#source-group-classification, verbatim.
SPEC_TABLE = [
    ("TauA", "", "Calibrator"),
    ("GField10", "", "Galactic"),
    ("GField30", "", "Galactic"),
    ("fg10", "", "Foreground"),
    ("co2", "", "CO"),
    ("Cosmos", "", "Other"),
    ("TauA", "Sky Nod", "SkyDip"),
    ("SkyDip", "", "SkyDip"),
]


@pytest.mark.parametrize(("source", "comment", "group"), SPEC_TABLE)
def test_spec_table(source, comment, group):
    assert classify(source, comment) == (source, group)


@pytest.mark.parametrize(
    ("source", "comment", "group"),
    [
        # case-insensitive, whole tokens
        ("taua", "", "Calibrator"),
        ("JUPITER", "", "Calibrator"),
        ("Moon", "", "Calibrator"),
        ("gfield", "", "Galactic"),
        ("field7b", "", "Galactic"),
        ("CO7", "", "CO"),
        ("co6a", "", "CO"),
        ("FG3", "", "Foreground"),
        ("Sky_Dip", "", "SkyDip"),
        ("sky-dip", "", "SkyDip"),
        ("sky dip", "", "SkyDip"),
        ("GField30", "sky dip at start", "SkyDip"),
        ("GField30", "SKY_NOD", "SkyDip"),
        # legacy substring bugs: none of these is CO / Galactic / SkyDip
        ("NGC_Cocoon", "", "Other"),
        ("co", "", "Other"),
        ("Cocoon2", "", "Other"),
        ("TauA_offset", "", "Other"),
        ("GField30x1", "", "Other"),
        ("fg", "", "Other"),
        ("GField30", "skynodding", "Galactic"),
        ("GField30", "not a skydipper", "Galactic"),
        # rule order: the comment rule wins over the calibrator rule
        ("Jupiter", "skydip", "SkyDip"),
    ],
)
def test_rules(source, comment, group):
    assert classify(source, comment)[1] == group


def test_source_is_first_stripped_token():
    assert classify(" GField30 , other, more", "") == ("GField30", "Galactic")
    assert classify(b"TauA,x", b"") == ("TauA", "Calibrator")
    assert source_name("") == "Unknown"
    assert source_name(None) == "Unknown"
    assert classify(" , TauA", None) == ("Unknown", "Other")


def test_groups_are_known():
    for source, comment, _ in SPEC_TABLE:
        assert classify(source, comment)[1] in SOURCE_GROUPS
