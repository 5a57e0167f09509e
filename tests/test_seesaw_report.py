"""bench/seesaw.py's paired bootstrap of CPI-FT's margin over a baseline, on per-item scores whose answer is known."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from seesaw import bootstrap_margin, margins_section  # noqa: E402


def _items(p: float, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [float(rng.random() < p) for _ in range(n)]


def test_a_clear_margin_is_separated_from_zero_and_no_margin_is_not():
    ahead = [
        (
            {"t": _items(0.6, 200, s), "u": _items(0.5, 200, s + 9)},
            {"t": _items(0.3, 200, s + 1), "u": _items(0.2, 200, s + 8)},
        )
        for s in range(3)
    ]
    margin, low, high = bootstrap_margin(ahead)
    assert 0.2 < margin < 0.4 and 0 < low < margin < high
    same = [({"t": _items(0.4, 200, s)}, {"t": _items(0.4, 200, s + 100)}) for s in range(3)]
    margin, low, high = bootstrap_margin(same)
    assert low < 0 < high and abs(margin) < 0.1


def test_paired_items_cancel_what_both_methods_share():
    """Identical per-item scores but for 10 items give an interval that holds only those 10 items' difference."""
    a = _items(0.5, 200, 0)
    b = list(a)
    for i in range(10):
        b[i] = 0.0 if a[i] else b[i]
    gain = sum(a[i] - b[i] for i in range(10)) / 200
    margin, low, high = bootstrap_margin([({"t": a}, {"t": b})])
    assert margin == pytest.approx(gain, abs=1e-12) and 0 <= low <= margin <= high <= 3 * gain


def test_the_table_says_which_margins_the_interval_separates():
    def seed(s):
        cpi = {"t": _items(0.7, 200, s)}
        return {
            "methods": {
                "cpi_ft": {"avg": sum(cpi["t"]) / 200, "items": cpi},
                "multitask": {"avg": 0.2, "items": {"t": _items(0.2, 200, s + 1)}},
                "lora_multitask": {"avg": 0.7, "items": {"t": _items(0.7, 200, s + 2)}},
                "probe": {"avg": 0.5, "items": {"other": [1.0]}},  # single-task rows: other items, no margin
            }
        }

    rows = "\n".join(margins_section([seed(0), seed(1)]))
    assert "| multitask | +" in rows and "yes, CPI-FT ahead" in rows.split("| multitask |")[1].split("\n")[0]
    assert "| no |" in rows.split("| lora_multitask |")[1].split("\n")[0] and "| probe |" not in rows
