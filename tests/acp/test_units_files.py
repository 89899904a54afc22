"""helexa-acp's local file access: reads that cannot hang, exhaust memory or read the
protocol stream; grep that skips what is not a regular text file; writes that are atomic
and keep line endings, permission bits and symlinks."""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
from pathlib import Path

import pytest

from helexa.acp import files, localfs
from helexa.acp.files import read_text_file, write_text_file
from helexa.acp.localfs import grep
from helexa.acp.workspace import ClientCaps, ToolError, Workspace


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_reads_refuse_what_is_not_a_regular_file(tmp_path: Path) -> None:
    pipe = fifo(tmp_path / "pipe")
    (tmp_path / "zero").symlink_to("/dev/zero")
    for path, said in [
        (pipe, "not a regular file"),  # opening it would block forever
        (tmp_path / "zero", "not a regular file"),  # reading it would fill memory
        (Path("/proc/self/fd/0"), "not a regular file|no such file|cannot read"),
        (tmp_path, "is a directory"),
        (tmp_path / "missing", "no such file"),
    ]:
        with pytest.raises(ToolError, match=said):
            read_text_file(path)

    class Editor:
        asked: list[str] = []

        async def read_text_file(self, path: str, **kwargs: object) -> object:
            self.asked.append(path)
            raise AssertionError("the editor must not be asked to read a FIFO")

    async def through_the_workspace() -> None:
        local = Workspace(None, "s", ClientCaps())
        editor = Workspace(Editor(), "s", ClientCaps(read_text_file=True))
        for ws in (local, editor):
            with pytest.raises(ToolError, match="not a regular file"):
                await asyncio.wait_for(ws.read_text(pipe, 1, 5), 5)
        assert Editor.asked == []

    asyncio.run(through_the_workspace())


def test_reads_are_capped_and_refuse_binary_files(tmp_path: Path) -> None:
    binary = tmp_path / "blob"
    binary.write_bytes(b"text\0more")
    with pytest.raises(ToolError, match="binary"):
        read_text_file(binary)
    big = tmp_path / "big.txt"
    big.write_text("".join(f"line {i}\n" for i in range(1, 2001)))  # ~19 KB
    with pytest.raises(ToolError, match="line and limit"):
        read_text_file(big, max_bytes=1024)
    # A range streams: only the lines kept count against the cap.
    assert read_text_file(big, 1500, 2, max_bytes=1024) == "line 1500\nline 1501\n"
    assert read_text_file(big, 2000, None, max_bytes=1024) == "line 2000\n"
    cut = read_text_file(big, 1, None, max_bytes=64)
    assert cut.startswith("line 1\n") and "stopped after 64 bytes" in cut
    with pytest.raises(ToolError, match="beyond its first"):
        read_text_file(big, 1990, 1, max_bytes=100)  # past 64 * 100 bytes of skipping
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ToolError, match="not a UTF-8"):
        read_text_file(latin)


def test_line_ranges_and_whole_reads_keep_crlf(tmp_path: Path) -> None:
    path = tmp_path / "dos.txt"
    path.write_bytes(b"1\r\n2\r\n3\r\n4\r\n")
    assert read_text_file(path) == "1\r\n2\r\n3\r\n4\r\n"
    assert read_text_file(path, 2, 2) == "2\r\n3\r\n"
    assert read_text_file(path, None, 1) == "1\r\n"
    assert read_text_file(path, 3, None) == "3\r\n4\r\n"
    write_text_file(path, "a\r\nb\r\n")
    assert path.read_bytes() == b"a\r\nb\r\n"


def test_grep_skips_devices_fifos_binaries_and_big_files(tmp_path: Path) -> None:
    fifo(tmp_path / "pipe")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "blob.bin").write_bytes(b"needle\0")
    (tmp_path / "huge.txt").write_bytes(b"needle\n" + b"x" * (files.MAX_READ_BYTES))
    (tmp_path / "src.py").write_text("a = 1\nneedle = 2\n")
    found = grep("needle", tmp_path, tmp_path, time_budget_s=10)
    assert found == "src.py:2:needle = 2"


@pytest.mark.parametrize("pattern", ["a{99999999999}", "(" * 5000 + ")" * 5000, "("])
def test_grep_reports_impossible_patterns(tmp_path: Path, pattern: str) -> None:
    with pytest.raises(ToolError, match="bad regular expression"):
        grep(pattern, tmp_path, tmp_path)


def test_grep_checks_its_time_budget_within_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "many.txt").write_text("x\n" * 5000)
    clock = itertools.count()  # a second passes at every look at the clock
    monkeypatch.setattr(localfs.time, "monotonic", lambda: next(clock))
    found = grep("x", tmp_path, tmp_path, max_matches=10_000, time_budget_s=2).splitlines()
    assert found[-1].startswith("(stopped after 2s")
    assert len(found) - 1 < 5000  # it gave up inside the one file


def test_writes_replace_atomically_keeping_mode_and_symlinks(tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text("old\n")
    script.chmod(0o750)
    link = tmp_path / "link.sh"
    link.symlink_to(script.name)
    write_text_file(link, "new\n")
    assert link.is_symlink() and script.read_text() == "new\n"
    assert stat.S_IMODE(script.stat().st_mode) == 0o750
    write_text_file(tmp_path / "deep" / "new.txt", "x")
    assert (tmp_path / "deep" / "new.txt").read_text() == "x"
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_failed_write_leaves_the_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keep.txt"
    path.write_text("original\n")

    def disk_full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", disk_full)
    with pytest.raises(ToolError, match="No space left"):
        write_text_file(path, "half")
    assert path.read_text() == "original\n"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
