"""The upstream pool's admission: free slots at once, a full pool queues first come first served, and a
slot is never lost to a request that stops waiting."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import Code, GatewayFailure
from gateway.pool import UpstreamPool


async def test_a_released_slot_goes_to_the_first_waiter() -> None:
    pool = UpstreamPool(size=1, wait_s=30, share=1.0)
    assert pool.try_acquire("a")
    assert not pool.try_acquire("b")  # full: the caller must wait
    second = asyncio.create_task(pool.acquire("b"))
    third = asyncio.create_task(pool.acquire("c"))
    await asyncio.sleep(0)  # both are queued now
    pool.release("a")
    await second
    assert not third.done()
    pool.release("b")
    await third
    pool.release("c")
    assert pool.try_acquire("d")  # and the slot is free again


async def test_a_waiter_that_leaves_takes_no_slot() -> None:
    pool = UpstreamPool(size=1, wait_s=30, share=1.0)
    assert pool.try_acquire("a")
    leaving = asyncio.create_task(pool.acquire("b"))
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    pool.release("a")
    assert pool.try_acquire("c")


async def test_a_slot_handed_over_as_the_wait_ends_is_passed_on() -> None:
    pool = UpstreamPool(size=1, wait_s=30, share=1.0)
    assert pool.try_acquire("a")
    handed = asyncio.create_task(pool.acquire("b"))
    next_in_line = asyncio.create_task(pool.acquire("c"))
    await asyncio.sleep(0)
    pool.release("a")  # the slot is handed to b...
    handed.cancel()  # ...which leaves before it ever runs again
    with pytest.raises(asyncio.CancelledError):
        await handed
    async with asyncio.timeout(10):  # a lost slot would leave c waiting for good
        await next_in_line  # c got the slot b could not use
    pool.release("c")
    assert pool.try_acquire("d")


async def test_a_full_pool_is_waited_for_at_most_wait_s() -> None:
    pool = UpstreamPool(size=1, wait_s=0.01, share=1.0)
    assert pool.try_acquire("a")
    with pytest.raises(GatewayFailure) as failure:
        await pool.acquire("b")
    assert failure.value.error.code is Code.UPSTREAM_BUSY
    pool.release("a")
    assert pool.try_acquire("b")


async def test_requests_that_stop_waiting_leave_the_queue() -> None:
    """A pool held full (long streams) refusing request after request must not grow its queue."""
    pool = UpstreamPool(size=1, wait_s=0.001, share=1.0)
    assert pool.try_acquire("a")
    for n in range(50):
        with pytest.raises(GatewayFailure):
            await pool.acquire(f"timed-out-{n}")
    leaving = [asyncio.create_task(pool.acquire(f"leaving-{n}")) for n in range(50)]
    await asyncio.sleep(0)
    assert pool.waiting == 50
    for task in leaving:
        task.cancel()
    await asyncio.gather(*leaving, return_exceptions=True)
    assert pool.waiting == 0
    pool.release("a")
    assert pool.try_acquire("b")


def test_one_address_holds_at_most_its_share() -> None:
    pool = UpstreamPool(size=4, wait_s=30, share=0.5)
    assert pool.try_acquire("a") and pool.try_acquire("a")
    with pytest.raises(GatewayFailure) as failure:
        pool.try_acquire("a")
    assert failure.value.error.code is Code.UPSTREAM_BUSY
    assert pool.try_acquire("b")
