"""cli.output.waiting / slow_notice: a wait of more than a second is told on stderr."""

from __future__ import annotations

import asyncio

import pytest

from metac.cli import output
from metac.core import client


@pytest.fixture(autouse=True)
def _quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "SLOW_AFTER", 0.2)


def test_a_long_wait_is_told_once_off_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("METAC_PROGRESS", "always")

    async def main() -> None:
        async with output.waiting("attaching ref://192.0.2.1/fs/" + "S" * 32):
            await asyncio.sleep(0.5)
        async with output.waiting("quick"):
            pass

    asyncio.run(main())
    err = capsys.readouterr().err
    assert err == "attaching ref://192.0.2.1/fs/SSSS… …\n"


def test_never_and_not_a_terminal_are_silent(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        async with output.waiting("attaching"):
            await asyncio.sleep(0.5)
        monkeypatch.setattr(client, "on_slow", output.slow_notice)
        with client.telling_if_slow("connecting to node 192.0.2.1:901 …"):
            await asyncio.sleep(0.5)

    monkeypatch.setenv("METAC_PROGRESS", "never")
    asyncio.run(main())
    monkeypatch.delenv("METAC_PROGRESS")  # auto: capsys's stderr is no terminal
    asyncio.run(main())
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("METAC_PROGRESS", "always")
    asyncio.run(main())
    assert capsys.readouterr().err == "attaching …\nconnecting to node 192.0.2.1:901 …\n"
