"""Sizes and counts as people read them in progress lines and tables."""

from __future__ import annotations

import pytest

from crowdtrain.progress import human_bytes, human_count


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 KB"), (387_200_000, "387.2 MB"), (5e12, "5000.0 GB")],
)
def test_human_bytes_uses_decimal_units(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (999_999, "999,999"),
        (1_476_600, "1.48M"),
        (123_456_789, "123.5M"),
        (5e9, "5.00G"),
        (2.5e11, "250.0G"),
    ],
)
def test_human_count_stays_short(n, text):
    assert human_count(n) == text
