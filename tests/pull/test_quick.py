"""dao pull's plain command lines, read before typer: the options must be the ones typer would have built."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dao import cli
from dao.pull import native
from dao.pull.options import PullOptions
from dao.pull.quick import parse

PLAIN = [
    ["busybox"],
    ["-q", "busybox:1.36"],
    ["--quiet", "--platform", "linux/arm64", "registry.test:5000/app@sha256:" + "a" * 64],
    ["--platform=linux/arm/v7", "--cache-dir", "/tmp/dao cache", "busybox"],
    ["--cache-dir=relative/dir", "busybox", "-q"],
]

NOT_PLAIN = [
    [],
    ["--help"],
    ["-h"],
    ["--load", "busybox"],
    ["--mirror", "http://127.0.0.1:5000", "busybox"],
    ["-o", "oci:out", "busybox"],
    ["busybox", "alpine"],
    ["--platform"],
    ["--platform", "--quiet", "busybox"],
    ["--platform=", "busybox"],
    ["-qq", "busybox"],
    ["--", "busybox"],
    ["--cache-prune"],
    ["--jobs", "4", "busybox"],
]


def typers_options(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> PullOptions:
    """What typer's path hands the engine path for ``dao pull ARGV``."""
    seen: list[PullOptions] = []

    def engine_path(options: PullOptions, out: object) -> int:
        seen.append(options)
        return 0

    monkeypatch.setattr(native, "engine_path", engine_path)
    result = CliRunner().invoke(cli.compose(["pull", *argv]), ["pull", *argv])
    assert result.exit_code == 0, result.output
    return seen[0]


@pytest.mark.parametrize("argv", PLAIN, ids=" ".join)
def test_a_plain_command_line_is_read_as_typer_reads_it(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAO_LOG", raising=False)
    assert parse(argv) == typers_options(argv, monkeypatch)


@pytest.mark.parametrize("argv", NOT_PLAIN, ids=" ".join)
def test_anything_else_is_left_to_typer(argv: list[str]) -> None:
    assert parse(argv) is None


def test_dao_log_is_left_to_typer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAO_LOG", "debug")  # typer's path sets up the logging it asks for
    assert parse(["busybox"]) is None
