"""Log lines cannot be forged: values from requests are escaped and cut."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pydriver.logs import MAX_VALUE_CHARS, JsonFormatter, TextFormatter, escape
from pydriver.server import Api, make_app

from .conftest import Env
from .fakes import create_network_body, hexid

FORGED = "\n2026-01-01 00:00:00,000 INFO pydriver.requests: fake"
LINE_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("pydriver")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
async def post(env: Env) -> AsyncIterator[Any]:
    sock_dir = Path(tempfile.mkdtemp(prefix="pyb-", dir="/tmp"))
    sock = sock_dir / "plugin.sock"
    runner = web.AppRunner(make_app(Api(env.driver, env.ipam)), access_log=None)
    await runner.setup()
    try:
        await web.UnixSite(runner, str(sock)).start()
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s:

            async def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
                async with s.post(f"http://plugin{path}", data=json.dumps(body)) as resp:
                    reply: dict[str, Any] = await resp.json(content_type=None)
                    return reply

            yield call
    finally:
        await runner.cleanup()
        shutil.rmtree(sock_dir, ignore_errors=True)


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def record(msg: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("pydriver.test", logging.WARNING, __file__, 1, msg, args, exc_info)


async def test_a_pool_id_cannot_forge_a_request_line(post: Any, text_log: io.StringIO) -> None:
    reply = await post("/IpamDriver.RequestAddress", {"PoolID": "x" + FORGED, "Address": ""})
    assert "Err" in reply
    (line,) = lines(text_log)  # one request, one line
    assert LINE_START.match(line)
    assert "pool=x\\n2026-01-01" in line


async def test_option_keys_with_control_characters_are_logged_escaped(
    post: Any, text_log: io.StringIO
) -> None:
    key = "evil\r\nkey\x1b[31m\x00\x7f\x85\u2028"
    reply = await post(
        "/NetworkDriver.CreateNetwork", create_network_body(hexid("log-net"), generic={key: "v"})
    )
    assert "does not support" in reply["Err"]
    (line,) = lines(text_log)
    assert "evil\\r\\nkey\\x1b[31m\\x00\\x7f\\x85\\u2028" in line
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028]", line)


def test_escape_every_control_character() -> None:
    assert escape("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert escape("\x00\x1b\x7f\x80\x9f") == "\\x00\\x1b\\x7f\\x80\\x9f"
    assert escape("\u2028\u2029\u202e\u2066") == "\\u2028\\u2029\\u202e\\u2066"
    assert escape("plain text, ünïcödé, 10.0.0.1/24 \\n") == "plain text, ünïcödé, 10.0.0.1/24 \\n"
    for code in range(0x10000):
        assert "\n" not in escape(chr(code))
        assert len(escape(chr(code)).splitlines()) == 1


def test_overlong_values_are_cut_in_both_formats() -> None:
    long = "A" * 5000
    rec = record("pool %s took %.1f ms (%d tries)", long, 1.25, 3)
    text = TextFormatter().format(rec)
    assert f"{'A' * MAX_VALUE_CHARS}...[{5000 - MAX_VALUE_CHARS} more characters]" in text
    assert text.endswith(" took 1.2 ms (3 tries)")
    rec = record("pool %s", long)
    rec.pool = long
    entry = json.loads(JsonFormatter().format(rec))
    assert len(entry["message"]) < 600
    assert len(entry["pool"]) < 600
    assert entry["pool"].endswith("more characters]")


def test_json_lines_stay_single_lines() -> None:
    rec = record("outcome %s", FORGED)
    rec.outcome = FORGED
    text = JsonFormatter().format(rec)
    assert "\n" not in text
    assert json.loads(text)["outcome"] == FORGED


def test_a_traceback_cannot_forge_a_line() -> None:
    try:
        raise RuntimeError("bad input" + FORGED + "\rmore")
    except RuntimeError as err:
        text = TextFormatter().format(record("internal error in %s", "x", exc=err))
    first, *rest = text.split("\n")
    assert LINE_START.match(first)
    assert rest
    assert all(line.startswith("  | ") for line in rest)
    assert any(line.startswith("  | Traceback") for line in rest)
    assert not any(LINE_START.match(line) for line in rest)
    assert "\r" not in text
    assert "\\rmore" in text


def test_mapping_arguments_are_handled() -> None:
    rec = logging.LogRecord(
        "pydriver.test", logging.INFO, __file__, 1, "%(a)s", ({"a": "x\ny"},), None
    )
    assert TextFormatter().format(rec).endswith(": x\\ny")
