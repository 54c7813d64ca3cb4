"""`fund-agent report`: one self-contained HTML file whose tables match the ledger, rendered by headless Chromium
into a screenshot that is not blank."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from test_audit_fixtures import A, B, C, build, write_config

pytestmark = pytest.mark.sqlite_only
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Tables(HTMLParser):
    """Every <table id=...> as a list of rows (header row first), cell text only."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.current: str | None = None
        self.row: list[str] | None = None
        self.cell: list[str] | None = None
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "table":
            self.current = dict(attrs).get("id") or ""
            self.tables[self.current] = []
        elif tag == "tr" and self.current is not None:
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None and self.row is not None:
            self.row.append("".join(self.cell))
            self.cell = None
        elif tag == "tr" and self.row is not None and self.current is not None:
            self.tables[self.current].append(self.row)
            self.row = None
        elif tag == "table":
            self.current = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def as_records(rows: list[list[str]]) -> list[dict[str, str]]:
    header, *body = rows
    return [dict(zip(header, r, strict=True)) for r in body if len(r) == len(header)]


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("report")
    write_config(directory)
    shutil.copy(REPO / "policies" / "example.yaml", directory / "policies" / "example.yaml")  # manages A
    build(directory / "ledger.db")
    result = run_cli("report", "--since", "2026-10-01", "--until", "2027-01-01", "--output", "report.html",
                     cwd=directory)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("wrote report.html (")
    return directory, directory / "report.html"


def test_the_page_is_self_contained(page: tuple[Path, Path]) -> None:
    text = page[1].read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "<script" not in text and " src=" not in text
    assert not re.search(r"url\((?!#)", text)  # only the SVG's own fragments (clip paths), nothing fetched
    assert 'href="http' not in text and "@import" not in text
    assert text.count("<svg") == 3 * 3  # equity, net funding, window usage for each of the three accounts


def test_the_tables_match_the_ledger(page: tuple[Path, Path]) -> None:
    directory, path = page
    parser = Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    totals = json.loads(run_cli("ledger", "--totals", "--since", "2026-10-01", "--until", "2027-01-01", "--format",
                                "json", cwd=directory).stdout)
    assert as_records(parser.tables["totals"]) == [{k: str(v) for k, v in r.items()} for r in totals]
    net = json.loads(run_cli("ledger", "--net", "--format", "json", cwd=directory).stdout)
    assert as_records(parser.tables["net"]) == [{k: str(v) for k, v in r.items()} for r in net]
    for account in (A, B, C):
        ledger = json.loads(run_cli("ledger", "--account", account, "--format", "json", cwd=directory).stdout)
        shown = as_records(parser.tables[f"transfers-{account}"])
        assert [(r["id"], r["amount"], r["state"], r["broker_txn_id"]) for r in shown] == [
            (str(t["id"]), t["amount"], t["state"], "" if t["broker_txn_id"] is None else str(t["broker_txn_id"]))
            for t in ledger]
    usage = as_records(parser.tables[f"usage-{A}"])
    # at 2027-01-01 only the total window holds A's confirmed 600.00 top-up (example policy: total 20000)
    assert {"kind": "top_up", "window": "total", "measure": "amount", "used": "600.00", "limit": "20000.00"} in usage
    halts = as_records(parser.tables[f"halts-{C}"])
    assert [(h["kind"], h["cleared_at"]) for h in halts] == [("kill_switch", "active")]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine: the screenshot check needs it")
def test_chromium_renders_a_page_that_is_not_blank(page: tuple[Path, Path], tmp_path: Path) -> None:
    import matplotlib.image
    import numpy

    shot = tmp_path / "shot.png"
    assert CHROMIUM is not None
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    page[1].as_uri()], capture_output=True, timeout=120, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    colours = numpy.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 50, f"only {len(colours)} colours: a blank or broken page"
    # the equity chart's markers: some green (top-up) and orange (sweep) pixels are there
    rgb = pixels[..., :3]
    green = (rgb[..., 1] > 0.5) & (rgb[..., 0] < 0.3) & (rgb[..., 2] < 0.3)
    assert green.sum() > 20
