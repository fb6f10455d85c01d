"""The bindings held on the broker, as pure logic: a recording binder stands in for it."""

from __future__ import annotations

import pytest
from binder import MISSING_EXCHANGE, RecordingBinder, settle

from quart_events.bindings import Binding
from quart_events.shared_bindings import SharedBinding, SharedBindings

A = Binding("exchange/a", "x.#")
B = Binding("exchange/a", "*.y")
MISSING = Binding(MISSING_EXCHANGE, "#")


class Settled(list[SharedBinding]):
    """The listener: records each binding the broker answered for."""

    def settled(self, share: SharedBinding) -> None:
        self.append(share)


def make() -> tuple[SharedBindings, RecordingBinder, list[SharedBinding]]:
    binder = RecordingBinder()
    shared = SharedBindings(binder)
    settled = Settled()
    shared.attach(settled)
    shared.start()
    return shared, binder, settled


def test_it_refuses_to_start_without_a_listener() -> None:
    """A forgotten wire fails at once, not silently."""
    with pytest.raises(RuntimeError, match="no listener"):
        SharedBindings(RecordingBinder()).start()


async def test_a_binding_is_bound_once_and_unbound_after_its_last_user() -> None:
    shared, binder, _ = make()
    first, second = shared.acquire(A), shared.acquire(A)
    await settle()
    assert binder.calls == [("bind", A)] and shared.in_effect(first) and first is second
    shared.release(first)
    await settle()
    assert binder.calls == [("bind", A)]
    shared.release(second)
    await settle()
    assert binder.calls == [("bind", A), ("unbind", A)] and not binder.bound
    assert shared.bindings() == set() and shared.pending == 0
    await shared.stop()


async def test_leaving_while_the_bind_runs_unbinds_after_it_and_a_new_user_binds_again() -> None:
    shared, binder, _ = make()
    binder.release.clear()
    share = shared.acquire(A)
    await settle()  # the bind is in flight
    shared.release(share)
    again = shared.acquire(A)
    assert not shared.in_effect(again)  # not until the broker said so on this connection
    binder.release.set()
    await settle()
    assert binder.calls == [("bind", A)] and shared.in_effect(again)
    shared.release(again)
    await settle()
    assert binder.calls == [("bind", A), ("unbind", A)]
    await shared.stop()


async def test_a_bind_whose_users_all_left_before_it_ran_is_never_sent() -> None:
    shared, binder, _ = make()
    binder.release.clear()
    blocker = shared.acquire(B)  # holds the worker
    await settle()
    for _ in range(1000):  # churn: join and leave before the worker gets to it
        shared.release(shared.acquire(A))
    assert shared.pending <= 2  # one step per distinct binding at most, never one per request
    binder.release.set()
    await settle()
    assert binder.calls == [("bind", B)] and A not in shared.bindings()
    shared.release(blocker)
    await shared.stop()


async def test_pending_work_is_bounded_by_distinct_bindings() -> None:
    shared, binder, _ = make()
    binder.release.clear()
    shares = [shared.acquire(Binding("exchange/a", f"k{n}")) for n in range(100)]
    for _ in range(50):  # the same hundred bindings wanted and dropped again and again
        for share in shares:
            shared.release(share)
        shares = [shared.acquire(Binding("exchange/a", f"k{n}")) for n in range(100)]
    assert shared.pending <= 100
    binder.release.set()
    await settle()
    assert len(binder.calls) == 100 and binder.bound == {share.binding for share in shares}
    await shared.stop()


async def test_a_refused_binding_settles_with_its_failure_and_is_tried_again_later() -> None:
    shared, binder, settled = make()
    share = shared.acquire(MISSING)
    await settle()
    assert settled == [share]
    assert str(share.failure) == f"exchange `{MISSING_EXCHANGE}` does not exist"
    assert not shared.in_effect(share)
    binder.missing.clear()  # the exchange was declared meanwhile
    again = shared.acquire(MISSING)
    await settle()
    assert again is share and share.failure is None and shared.in_effect(share)
    assert binder.calls == [("bind", MISSING), ("bind", MISSING)]
    await shared.stop()


async def test_after_a_reconnect_every_binding_is_bound_again_on_the_new_connection() -> None:
    shared, binder, settled = make()
    shares = [shared.acquire(A), shared.acquire(B)]
    await settle()
    binder.reconnect()
    assert not any(shared.in_effect(share) for share in shares)
    settled.clear()
    shared.connected()
    await settle()
    assert all(shared.in_effect(share) for share in shares) and settled == shares
    assert binder.bound == {A, B}
    await shared.stop()


async def test_a_restore_interrupted_by_a_second_loss_is_done_on_the_next_connection() -> None:
    shared, binder, _ = make()
    share = shared.acquire(A)
    await settle()
    binder.reconnect()
    binder.release.clear()
    shared.connected()
    await settle()  # the rebind is in flight ...
    binder.lose()  # ... when the connection goes again
    binder.release.set()
    await settle()
    assert not shared.in_effect(share) and shared.pending == 1  # kept for the next connection
    binder.reconnect()
    shared.connected()
    await settle()
    assert shared.in_effect(share) and binder.bound == {A} and shared.pending == 0
    await shared.stop()


async def test_nothing_is_sent_while_disconnected_and_leaving_then_costs_nothing() -> None:
    shared, binder, _ = make()
    binder.lose()
    share = shared.acquire(A)
    await settle()
    assert binder.calls == [] and shared.pending == 1
    shared.release(share)
    assert shared.pending == 0 and shared.bindings() == set()
    await shared.stop()
