"""Market feed decider: given events, when a command, then events (no Ray)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.decider import CommandRejected, UnknownEntity
from actors.market import MARKET, RETAINED_INTERVALS, MarketState
from events.market import (
    CheckFeedDeadline,
    MarketRegistered,
    PricePublished,
    PriceRevised,
    PublishPrice,
    RegisterMarket,
    SignalTimedOut,
)

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def registered(kind: str = "real_time", deadline_ms: int | None = None) -> MarketState:
    return MARKET.fold("nl", [MarketRegistered(market_id="nl", kind=kind, deadline_ms=deadline_ms)])


def publish(minute: int, price: float, version: int = 1, at: datetime = T0) -> PublishPrice:
    start = T0 + timedelta(minutes=15 * minute)
    return PublishPrice(
        command_id=f"nl:{minute}:{version}:{price}",
        issued_at=at,
        market_id="nl",
        interval_start=start,
        interval_minutes=15,
        price_eur_per_mwh=price,
        version=version,
    )


def run(state: MarketState, command) -> tuple[MarketState, list]:
    events = MARKET.decide(command, state)
    for event in events:
        state = MARKET.evolve(state, event)
    return state, events


def test_stream_id_names_the_market() -> None:
    assert publish(0, 50.0).stream_id == "market-nl" == MARKET.stream_id("nl")


def test_a_new_price_is_published_and_a_repeat_adds_nothing() -> None:
    state, events = run(registered(), publish(0, 50.0))
    assert [type(e) for e in events] == [PricePublished]
    assert run(state, publish(0, 50.0))[1] == []


def test_a_higher_version_with_a_new_price_is_a_revision() -> None:
    state, _ = run(registered(), publish(0, 50.0, version=1))
    _, events = run(state, publish(0, 55.5, version=2))
    (revised,) = events
    assert isinstance(revised, PriceRevised)
    assert (revised.old_price_eur_per_mwh, revised.new_price_eur_per_mwh) == (50.0, 55.5)


@pytest.mark.parametrize("version", [0, 1])
def test_a_different_price_without_a_higher_version_is_a_conflict(version: int) -> None:
    state, _ = run(registered(), publish(0, 50.0, version=1))
    with pytest.raises(CommandRejected, match="conflicting price"):
        MARKET.decide(publish(0, 60.0, version=version), state)


def test_negative_prices_are_prices() -> None:
    _, events = run(registered(), publish(0, -500.0))
    assert events[0].price_eur_per_mwh == -500.0


def test_an_unregistered_market_is_unknown() -> None:
    with pytest.raises(UnknownEntity):
        MARKET.decide(publish(0, 1.0), MARKET.initial_state("nl"))


def test_silence_beyond_the_deadline_times_out_once_per_silence() -> None:
    state, _ = run(registered(), publish(0, 50.0, at=T0))
    check = CheckFeedDeadline(command_id="c1", issued_at=T0, market_id="nl", now=T0)
    assert run(state, check.model_copy(update={"now": T0 + timedelta(milliseconds=400)}))[1] == []
    state, events = run(state, check.model_copy(update={"now": T0 + timedelta(milliseconds=600)}))
    assert [type(e) for e in events] == [SignalTimedOut]
    assert run(state, check.model_copy(update={"now": T0 + timedelta(seconds=5)}))[1] == []
    state, _ = run(state, publish(1, 51.0, at=T0 + timedelta(seconds=6)))
    later = check.model_copy(update={"now": T0 + timedelta(seconds=7)})
    assert [type(e) for e in run(state, later)[1]] == [SignalTimedOut]


def test_day_ahead_deadline_is_configurable() -> None:
    state, _ = run(registered("day_ahead", deadline_ms=60_000), publish(0, 50.0))
    check = CheckFeedDeadline(
        command_id="c", issued_at=T0, market_id="nl", now=T0 + timedelta(seconds=59)
    )
    assert run(state, check)[1] == []
    assert run(state, check.model_copy(update={"now": T0 + timedelta(seconds=61)}))[1] != []


def test_register_twice_is_idempotent_but_a_different_kind_is_rejected() -> None:
    state = registered()
    same = RegisterMarket(command_id="r", issued_at=T0, market_id="nl", kind="real_time")
    assert MARKET.decide(same, state) == []
    with pytest.raises(CommandRejected):
        MARKET.decide(same.model_copy(update={"kind": "day_ahead"}), state)


def test_state_stays_bounded_and_stale_prices_are_refused() -> None:
    state = registered()
    for minute in range(RETAINED_INTERVALS + 50):
        state, _ = run(state, publish(minute, float(minute)))
    assert len(state.prices) == RETAINED_INTERVALS
    with pytest.raises(CommandRejected, match="older than"):
        MARKET.decide(publish(0, 0.0), state)


@given(
    minutes=st.lists(st.integers(0, 20), min_size=1, max_size=15),
    prices=st.lists(st.floats(-500, 1000, allow_nan=False), min_size=15, max_size=15),
    versions=st.lists(st.integers(0, 3), min_size=15, max_size=15),
)
def test_deciding_twice_on_the_evolved_state_adds_nothing(minutes, prices, versions) -> None:
    state = registered()
    for k, minute in enumerate(minutes):
        command = publish(minute, prices[k], versions[k])
        try:
            state, _ = run(state, command)
        except CommandRejected:
            continue
        assert MARKET.decide(command, state) == []
