"""Hostile status files: every bad one is a NoReading with a one-line reason, never a crash or a hang."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import write_status

from agent import safe_io
from agent.equity.base import NoReading
from agent.equity.ea_file import EaFileSource, parse_status
from agent.timeutil import Clock

LOGIN = "130002534"
BASE = {"schema": 1, "login": 130002534, "server": "DerivSVG-Server", "currency": "USD", "balance": 1000,
        "equity": 950, "margin": 10, "margin_free": 940, "margin_level": 9501, "positions": 2,
        "connected": True, "time": 1764068400}


def status(**fields: object) -> str:
    """The base status with some fields replaced by raw JSON text (so numbers keep their exact spelling)."""
    body = {**BASE, **{key: f"@{key}@" for key in fields}}
    text = json.dumps(body)
    for key, raw in fields.items():
        text = text.replace(f'"@{key}@"', str(raw))
    return text


def refused(text: str | bytes) -> str:
    with pytest.raises(NoReading) as info:
        parse_status(text, LOGIN)
    reason = str(info.value)
    assert "\n" not in reason and len(reason) < 300, reason
    return reason


def test_the_base_status_is_good():
    snap = parse_status(status(equity="950.12345678", margin_level="0"), LOGIN)
    assert snap.equity == Decimal("950.12345678") and snap.margin_level == 0


@pytest.mark.parametrize("raw, why", [
    ("1e26", "out of range"), ("-1e26", "out of range"), ("100000000000000000000000000", "out of range"),
    ("1000000000000000", "out of range"), ("1e15", "out of range"), ("-999999999999999999", "out of range"),
    ("1e999999999", "out of range"), ("1e-9999999999999999999", "out of range"),
    ("0." + "0" * 200 + "1", "characters"), ("950.123456789", "more than 8 decimal places"),
    ("1e-9", "more than 8 decimal places"), ("NaN", "not valid JSON"), ("Infinity", "not valid JSON"),
    ("-Infinity", "not valid JSON"), ("1" * 5000, "not valid JSON"), ('"950.12"', "equity"), ("true", "equity"),
    ("null", "equity"), ("[950]", "equity"),
])
def test_absurd_amounts(raw, why):
    assert why in refused(status(equity=raw))


def test_amount_edge_values_are_taken():
    snap = parse_status(status(equity="999999999999999.99999999", balance="-999999999999999",
                               margin="1.000000000000000000000000000000000000000", margin_free="1e3"), LOGIN)
    assert snap.equity == Decimal("999999999999999.99999999") and snap.balance == -999999999999999
    assert snap.margin == 1 and snap.margin_free == 1000
    assert snap.margin.quantize(Decimal("0.01")) == Decimal("1.00")  # usable by money.quantize


@pytest.mark.parametrize("raw, why", [
    ("1000000000000", "time"), ("100000000000000000000", "time"), ("-100000000000000000000", "time"),
    ("1e12", "whole seconds"), ("1e20", "whole seconds"), ("-1e20", "whole seconds"), ("-1", "out of range"),
    (str(2 ** 33), "out of range"), ("1764068400.5", "whole seconds"), ('"now"', "time"), ("true", "time"),
])
def test_absurd_times(raw, why):
    assert why in refused(status(time=raw))


def test_time_edges_are_taken():
    assert parse_status(status(time="0"), LOGIN).taken_at.year == 1970
    assert parse_status(status(time=str(2 ** 33 - 1)), LOGIN).taken_at.year == 2242


@pytest.mark.parametrize("field, raw, why", [
    ("login", "0", "numeric login"), ("login", "-130002534", "numeric login"), ("login", str(2 ** 63), "numeric login"),
    ("login", "1" * 4000, "numeric login"), ("login", "130002534.0", "numeric login"),
    ("positions", "-1", "positions"), ("positions", str(10 ** 6 + 1), "positions"), ("positions", '"2"', "positions"),
    ("positions", "2.5", "positions"), ("schema", "true", "schema"), ("schema", "1.0", "schema"),
    ("schema", json.dumps("x" * 10000), "schema"), ("currency", json.dumps("U" * 10000), "currency"),
    ("currency", '"US\\nD"', "currency"), ("currency", '""', "currency"), ("connected", "1", "connected"),
])
def test_absurd_other_fields(field, raw, why):
    assert why in refused(status(**{field: raw}))


def test_missing_positions_is_still_taken():
    body = {key: value for key, value in BASE.items() if key != "positions"}
    assert parse_status(json.dumps(body), LOGIN).positions is None


@pytest.mark.parametrize("text", [
    "[" * 100_000, "{" * 30_000, '{"a":' * 10_000 + "1" + "}" * 10_000,
    status(server="[" * 21 + "]" * 21), status(server='{"a":' * 25 + "1" + "}" * 25),
    "[" * 100_000 + "]" * 100_000,
])
def test_deep_nesting_is_refused_before_parsing(text):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # even a small stack cannot be blown: the depth is checked before json.loads
    try:
        reason = refused(text)
    finally:
        sys.setrecursionlimit(limit)
    assert "nested" in reason or "larger than" in reason


def test_nesting_within_the_limit_and_brackets_in_strings_are_fine():
    parse_status(status(server="[" * 19 + "]" * 19), LOGIN)
    parse_status(status(server=json.dumps("[" * 1000 + '\\"{{{')), LOGIN)


def test_size_limit():
    padded = status(server=json.dumps("x" * (64 * 1024)))
    assert "larger than 65536 bytes" in refused(padded)
    assert "larger than 65536 bytes" in refused(padded.encode())


@pytest.mark.parametrize("raw, why", [
    (b"\xff\xfe\x00garbage", "not valid JSON"), (b"\x00" * 100, "not valid JSON"), (b"\xc3\x28", "not valid JSON"),
    (b"", "not valid JSON"), ('"\ud800"'.encode("utf-8", "surrogatepass"), "JSON object"),
    (status(currency='"\\ud800"').encode(), "currency"),
])
def test_raw_bytes(raw, why):
    assert why in refused(raw)


def test_a_bom_and_utf16_are_read_as_json_would():
    text = status()
    assert parse_status(b"\xef\xbb\xbf" + text.encode(), LOGIN).equity == 950
    assert parse_status(text.encode("utf-16"), LOGIN).equity == 950


# --- the file itself: only a small regular file is read -------------------------------------------------------

def read_quickly(path_dir: Path) -> str:
    """EaFileSource.read in a thread: it must come back (with NoReading) within two seconds."""
    outcome: list[BaseException | object] = []

    def run() -> None:
        try:
            outcome.append(EaFileSource(path_dir, Clock()).read("MTR130002534"))
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(2)
    assert not worker.is_alive(), "EaFileSource.read hung"
    assert time.monotonic() - started < 2
    assert isinstance(outcome[0], NoReading), outcome
    reason = str(outcome[0])
    assert "\n" not in reason
    return reason


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "status-130002534.json")
    assert "a FIFO, not a regular file" in read_quickly(tmp_path)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_a_link_to_dev_zero_is_refused_without_reading_it(tmp_path):
    (tmp_path / "status-130002534.json").symlink_to("/dev/zero")
    assert "a character device, not a regular file" in read_quickly(tmp_path)


def test_a_directory_is_refused(tmp_path):
    (tmp_path / "status-130002534.json").mkdir()
    assert "a directory" in read_quickly(tmp_path)


def test_a_huge_regular_file_is_refused_after_64_kib(tmp_path):
    path = tmp_path / "status-130002534.json"
    with open(path, "wb") as handle:
        handle.truncate(10 * 1024 * 1024 * 1024)  # sparse 10 GiB: only 64 KiB + 1 may be read
    assert "larger than 65536 bytes" in read_quickly(tmp_path)


def test_a_link_to_a_good_file_is_read(tmp_path):
    real = write_status(tmp_path / "real", equity="321.09")
    (tmp_path / "status-130002534.json").symlink_to(real)
    assert EaFileSource(tmp_path, Clock()).read("MTR130002534").equity == Decimal("321.09")


def test_a_dangling_link_is_missing(tmp_path):
    (tmp_path / "status-130002534.json").symlink_to(tmp_path / "nowhere")
    assert "missing" in read_quickly(tmp_path)


def test_absurd_time_in_a_file_is_a_no_reading(tmp_path):
    write_status(tmp_path, time=10 ** 20)
    assert "out of range" in read_quickly(tmp_path)


def test_read_small_file_exact_limit(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert safe_io.read_small_file(path, 100) == b"x" * 100
    with pytest.raises(safe_io.UnsafeInput):
        safe_io.read_small_file(path, 99)
