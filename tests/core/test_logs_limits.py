"""Log lines carry no terminal escapes off a TTY (uvicorn's ``color_message`` never becomes a
field), and each daemon raises its open-file soft limit at start."""

from __future__ import annotations

import io
import logging
import resource
import subprocess
import sys

import pytest

from helexa.core import logs
from helexa.core.limits import raise_nofile
from helexa.core.logs import LogfmtFormatter, setup_logging, strip_ansi

ANSI_MESSAGE = "Uvicorn running on \x1b[1mhttp://127.0.0.1:8000\x1b[0m (Press CTRL+C to quit)"


def uvicorn_record() -> logging.LogRecord:
    """What uvicorn logs: a plain message plus ``color_message`` with ANSI colours."""
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "%s", ("x",), None)
    record.msg = "Started server process [%d]"
    record.args = (42,)
    record.color_message = "Started server process [\x1b[36m%d\x1b[0m]"  # type: ignore[attr-defined]
    return record


def test_color_message_is_never_a_field() -> None:
    line = LogfmtFormatter().format(uvicorn_record())
    assert "color_message" not in line and "\x1b" not in line
    assert 'msg="Started server process [42]"' in line


def test_ansi_is_stripped_unless_the_stream_is_a_tty() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, ANSI_MESSAGE, (), None)
    record.url = "\x1b[31mred\x1b[0m"  # type: ignore[attr-defined]
    plain = LogfmtFormatter(strip_ansi=True).format(record)
    assert "\x1b" not in plain and "url=red" in plain
    assert "\x1b[1m" in LogfmtFormatter(strip_ansi=False).format(record)
    assert strip_ansi("\x1b[1;32mok\x1b[0m \x1b[2Kdone") == "ok done"


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize("tty", [False, True])
def test_setup_logging_strips_only_off_a_tty(monkeypatch: pytest.MonkeyPatch, tty: bool) -> None:
    stream = FakeStream(tty)
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("info")
        logging.getLogger("uvicorn.error").handle(uvicorn_record())
        logging.getLogger("t").info(ANSI_MESSAGE)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    text = stream.getvalue()
    assert "color_message" not in text
    assert ("\x1b" in text) is tty


def test_a_real_daemon_log_has_no_escapes() -> None:
    """stderr to a pipe, as under systemd or `cortex up`: uvicorn's own lines arrive plain."""
    code = (
        "import logging; from helexa.core.logs import setup_logging; setup_logging('info');"
        "logging.getLogger('uvicorn.error').info("
        "'Started server process [%d]', 7, extra={'color_message': '\\x1b[36m%d\\x1b[0m'})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert 'msg="Started server process [7]"' in result.stderr
    assert "\x1b" not in result.stderr and "color_message" not in result.stderr


# --- open files ---------------------------------------------------------------------------


@pytest.fixture
def restore_nofile():  # type: ignore[no-untyped-def]
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield saved
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def test_raise_nofile_goes_to_the_hard_limit(
    restore_nofile: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    _soft, hard = restore_nofile
    if hard != resource.RLIM_INFINITY and hard < 64:
        pytest.skip("hard limit too low to test with")
    low = 64
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    caplog.set_level(logging.INFO, logger="helexa.limits")
    limit = raise_nofile()
    now_soft, now_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert now_hard == hard and limit.before == low
    if hard == resource.RLIM_INFINITY:
        assert now_soft > low
    else:
        assert now_soft == hard and limit.soft == hard
    [record] = [r for r in caplog.records if r.getMessage() == "open-file limit"]
    assert record.levelno == logging.INFO and record.nofile == limit.soft  # type: ignore[attr-defined]


def test_raise_nofile_never_lowers_or_exceeds(restore_nofile: tuple[int, int]) -> None:
    soft, hard = restore_nofile
    if hard != resource.RLIM_INFINITY and soft >= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard // 2, 1), hard))
        soft = max(hard // 2, 1)
    assert raise_nofile(want=1).soft == soft  # below the current soft limit: left alone
    if hard != resource.RLIM_INFINITY:
        assert raise_nofile(want=hard * 4).soft == hard  # capped at the hard limit


def test_both_daemons_raise_it_at_start() -> None:
    """Wired into `cortex serve` and `neuron` (the CLIs call it after logging is set up)."""
    import inspect

    from helexa.cortex import cli as cortex_cli
    from helexa.neuron import cli as neuron_cli

    for source in (inspect.getsource(cortex_cli.serve), inspect.getsource(neuron_cli.serve)):
        assert "raise_nofile()" in source
        assert source.index("setup_logging(") < source.index("raise_nofile()")
    assert logs.LogfmtFormatter  # the module both daemons log through


def test_control_characters_never_reach_the_line_raw() -> None:
    """A client puts NUL, CR or a tab in a path (``/v1/requests/%00/cancel``): one line,
    every control character escaped."""
    record = logging.LogRecord("helexa.test", logging.INFO, __file__, 1, "request", (), None)
    record.path = "/v1/requests/\x00\r\n\t\x7f/cancel"  # type: ignore[attr-defined]
    line = LogfmtFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x00" not in line and "\x7f" not in line
    assert 'path="/v1/requests/\\x00\\r\\n\\t\\x7f/cancel"' in line


def test_terminal_escapes_in_fields_never_reach_the_line_raw() -> None:
    """A client's path with ESC c (a terminal reset) or a C1 CSI: escaped on a terminal
    too; ANSI colour sequences in a field are dropped."""
    record = logging.LogRecord("helexa.test", logging.INFO, __file__, 1, "a\x00b", (), None)
    record.path = "/a\x1bc\x9bX\x1b[2J"  # type: ignore[attr-defined]
    for strip in (True, False):
        line = LogfmtFormatter(strip_ansi=strip).format(record)
        assert not any(c in line for c in "\x1b\x9b\x00"), line
        assert 'path="/a\\x1bc\\x9bX"' in line and 'msg="a\\x00b"' in line
