"""The ROI report: summary and charts from the projections of the story log."""

from __future__ import annotations

import io
import os

import pytest
from rich.console import Console

from projections.replay import replay
from projections.report import roi_report
from projections.roi_config import RoiConfigError
from tests.projections.test_store import build_story

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "projections", "roi_example.toml")
PNG = b"\x89PNG\r\n\x1a\n"


def test_report_writes_summary_and_four_pngs(tmp_path: object) -> None:
    tmp = str(tmp_path)
    build_story(os.path.join(tmp, "log"))
    db = os.path.join(tmp, "p.duckdb")
    replay(os.path.join(tmp, "log"), db)
    out = os.path.join(tmp, "report")
    report = roi_report(CONFIG, db, out, console=Console(file=io.StringIO()))
    assert set(report.charts) == {
        "cash_flows",
        "npv_distribution",
        "revenue_by_stream",
        "fleet_soh",
    }
    for path in report.charts.values():
        with open(path, "rb") as f:
            assert f.read(8) == PNG
    assert report.summary["observed peak_shaving"] == "150.00 EUR"
    assert report.summary["observed regulation"] == "2.05 EUR"  # capacity 1.25 + energy 0.80
    assert report.summary["vehicles in projection"] == "1"
    assert not report.notes
    with open(os.path.join(out, "summary.txt")) as f:
        assert "NPV" in f.read()


def test_report_on_empty_projections_says_what_it_shows(tmp_path: object) -> None:
    tmp = str(tmp_path)
    from events.log import EventLog

    EventLog(os.path.join(tmp, "log")).close()
    db = os.path.join(tmp, "p.duckdb")
    replay(os.path.join(tmp, "log"), db)
    report = roi_report(CONFIG, db, os.path.join(tmp, "r"), console=Console(file=io.StringIO()))
    assert "fleet_soh" not in report.charts
    assert len(report.notes) == 2


def test_bad_config_and_missing_database_are_clear_errors(tmp_path: object) -> None:
    tmp = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="replay first"):
        roi_report(CONFIG, os.path.join(tmp, "none.duckdb"), tmp)
    db = os.path.join(tmp, "p.duckdb")
    from events.log import EventLog

    EventLog(os.path.join(tmp, "log")).close()
    replay(os.path.join(tmp, "log"), db)
    bad = os.path.join(tmp, "bad.toml")
    with open(bad, "w") as f:
        f.write("[finance]\ndiscount_rat = 0.07\n")
    with pytest.raises(RoiConfigError, match="discount_rat"):
        roi_report(bad, db, tmp)
