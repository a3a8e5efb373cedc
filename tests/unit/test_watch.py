"""The config watcher without a gateway: which file changes call the reload, and which do not.

`check()` is driven directly (one poll per call), so no test waits for a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.reload import ReloadResult
from gateway.watch import UNREADABLE_POLLS, ConfigWatch, file_digest
from tests.conftest import Logs


class Reloads:
    """A stand-in for `Gateway.reload()` that counts its calls and answers `ok`."""

    def __init__(self, ok: bool = True) -> None:
        self.calls = 0
        self.ok = ok

    async def __call__(self) -> ReloadResult:
        self.calls += 1
        return ReloadResult(self.ok, "")


@contextlib.asynccontextmanager
async def watching(path: Path, reloads: Reloads) -> AsyncIterator[ConfigWatch]:
    """A started watcher whose own loop never polls during a test (an hour apart): `check()` is by hand."""
    watch = ConfigWatch(path, reloads, interval_s=3600)
    watch.start(file_digest(path))
    try:
        yield watch
    finally:
        await watch.stop()


async def polls(watch: ConfigWatch, count: int) -> list[bool]:
    """`count` polls in a row: for each, whether it reloaded."""
    return [await watch.check() for _ in range(count)]


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


async def test_an_unchanged_file_is_not_reloaded(tmp_path: Path) -> None:
    path, reloads = config_file(tmp_path, "a: 1\n"), Reloads()
    async with watching(path, reloads) as watch:
        assert await polls(watch, 3) == [False, False, False]
        os.utime(path)  # a touch changes the mtime, not the content
        assert await polls(watch, 2) == [False, False]
    assert reloads.calls == 0


async def test_a_same_size_in_place_edit_is_reloaded_once(tmp_path: Path) -> None:
    path, reloads = config_file(tmp_path, "rate_limit: {max_requests: 5}\n"), Reloads()
    before = path.stat()
    async with watching(path, reloads) as watch:
        with path.open("r+") as f:  # same inode, same size, and the mtime put back: only the bytes differ
            f.write("rate_limit: {max_requests: 7}\n")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = path.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
        )
        assert await polls(watch, 3) == [False, True, False]  # seen, seen again: reloaded, once
    assert reloads.calls == 1


async def test_a_file_still_being_written_is_not_reloaded_until_it_settles(tmp_path: Path) -> None:
    path, reloads = config_file(tmp_path, "rate_limit: {max_requests: 5}\n"), Reloads()
    async with watching(path, reloads) as watch:
        path.write_text("rate_limit: {max_")  # a poll that lands mid-write reads this
        assert await polls(watch, 1) == [False]
        path.write_text("rate_limit: {max_requests: 7}\n")
        assert await polls(watch, 3) == [False, True, False]
    assert reloads.calls == 1


async def test_an_edit_made_while_the_gateway_started_is_reloaded(tmp_path: Path) -> None:
    path, reloads = config_file(tmp_path, "a: 1\n"), Reloads()
    baseline = file_digest(path)  # read before the config is loaded
    path.write_text("a: 2\n")  # edited during the load and start-up
    watch = ConfigWatch(path, reloads, interval_s=3600)
    watch.start(baseline)
    try:
        assert await polls(watch, 3) == [False, True, False]
    finally:
        await watch.stop()
    assert reloads.calls == 1


async def test_a_file_renamed_over_the_old_one_is_reloaded(tmp_path: Path) -> None:
    path, reloads = config_file(tmp_path, "a: 1\n"), Reloads()
    async with watching(path, reloads) as watch:
        new = tmp_path / "gateway.yaml.tmp"
        new.write_text("a: 2\n")
        new.replace(path)
        assert await polls(watch, 2) == [False, True]
    assert reloads.calls == 1


async def test_a_configmap_data_symlink_swap_is_reloaded(tmp_path: Path) -> None:
    first = tmp_path / "..2026_12_06_19_00_00.1"
    first.mkdir()
    (first / "gateway.yaml").write_text("a: 1\n")
    (tmp_path / "..data").symlink_to(first.name)
    path = tmp_path / "gateway.yaml"
    path.symlink_to("..data/gateway.yaml")
    reloads = Reloads()
    async with watching(path, reloads) as watch:
        second = tmp_path / "..2026_12_06_19_05_00.2"
        second.mkdir()
        (second / "gateway.yaml").write_text("a: 2\n")
        (tmp_path / "..data_tmp").symlink_to(second.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        assert await polls(watch, 2) == [False, True]
    assert reloads.calls == 1


async def test_a_bad_file_is_reloaded_once_and_its_fix_again(tmp_path: Path) -> None:
    path, reloads = config_file(tmp_path, "a: 1\n"), Reloads(ok=False)
    async with watching(path, reloads) as watch:
        path.write_text("a: [\n")
        assert await polls(watch, 5) == [False, True, False, False, False]
        reloads.ok = True
        path.write_text("a: 2\n")
        assert await polls(watch, 2) == [False, True]
    assert reloads.calls == 2


async def test_a_file_gone_for_a_while_is_not_a_change_and_is_logged_once(tmp_path: Path, logs: Logs) -> None:
    path, reloads = config_file(tmp_path, "a: 1\n"), Reloads()
    async with watching(path, reloads) as watch:
        path.unlink()
        assert await polls(watch, 1) == [False]
        assert logs.named("config_watch_unreadable") == []  # one miss: a swap in progress says nothing
        assert await polls(watch, UNREADABLE_POLLS + 2) == [False] * (UNREADABLE_POLLS + 2)
        [warning] = logs.named("config_watch_unreadable")
        assert (warning["config"], warning["error"]) == (str(path), "No such file or directory")
        path.write_text("a: 1\n")  # back as it was: nothing to reload
        assert await polls(watch, 2) == [False, False]
        path.write_text("a: 2\n")
        assert await polls(watch, 2) == [False, True]
    assert reloads.calls == 1


async def test_the_watcher_polls_on_its_own_and_stops_cleanly(tmp_path: Path) -> None:
    path, reloads = config_file(tmp_path, "a: 1\n"), Reloads()
    checks: list[int] = []
    watch = ConfigWatch(path, reloads, on_check=lambda: checks.append(1), interval_s=0.01)
    watch.start(file_digest(path))
    async with asyncio.timeout(15):
        path.write_text("a: 2\n")
        while reloads.calls == 0:
            await asyncio.sleep(0.01)
        await watch.stop()
    assert reloads.calls == 1 and len(checks) >= 2
    assert [t for t in asyncio.all_tasks() if t.get_name() == "config-watch"] == []
