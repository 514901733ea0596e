"""The market feed: prices in, revisions and silences noticed. Pure decider.

State is bounded: per interval start it keeps the latest (version, price), but only
for the newest `RETAINED_INTERVALS` intervals (a ring by interval start). That is
what idempotency and revision detection need for a feed whose publications arrive
in time order; a publication for an interval older than the retained window is
rejected as stale rather than silently accepted twice. 2 days of 15-minute
real-time intervals (192) or 8 days of hourly day-ahead prices fit in 200.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from actors.decider import CommandRejected, Decider, UnknownEntity
from events.base import Event, utc
from events.market import (
    CheckFeedDeadline,
    MarketKind,
    MarketRegistered,
    PricePublished,
    PriceRevised,
    PublishPrice,
    RegisterMarket,
    SignalTimedOut,
)

RETAINED_INTERVALS = 200
REAL_TIME_DEADLINE_MS = 500
DAY_AHEAD_DEADLINE_MS = 26 * 3600 * 1000  # one auction a day, with slack


class MarketState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    market_id: str
    registered: bool = False
    kind: MarketKind = "real_time"
    deadline_ms: int = REAL_TIME_DEADLINE_MS
    last_price_at: datetime | None = None
    timed_out: bool = False
    # interval start (UTC, ISO) -> (version, price), newest RETAINED_INTERVALS only
    prices: tuple[tuple[str, int, float], ...] = ()


def initial_state(market_id: str) -> MarketState:
    return MarketState(market_id=market_id)


def _key(interval_start: datetime) -> str:
    return utc(interval_start).isoformat()


def _remember(state: MarketState, key: str, version: int, price: float) -> MarketState:
    kept = {k: (v, p) for k, v, p in state.prices}
    kept[key] = (version, price)
    newest = sorted(kept)[-RETAINED_INTERVALS:]
    return state.model_copy(update={"prices": tuple((k, *kept[k]) for k in newest)})


def evolve(state: MarketState, event: Event) -> MarketState:
    match event:
        case MarketRegistered(kind=kind, deadline_ms=deadline_ms):
            default = REAL_TIME_DEADLINE_MS if kind == "real_time" else DAY_AHEAD_DEADLINE_MS
            return state.model_copy(
                update={"registered": True, "kind": kind, "deadline_ms": deadline_ms or default}
            )
        case PricePublished() | PriceRevised():
            price = (
                event.price_eur_per_mwh
                if isinstance(event, PricePublished)
                else event.new_price_eur_per_mwh
            )
            moved = _remember(state, _key(event.interval_start), event.version, price)
            return moved.model_copy(update={"last_price_at": event.received_at, "timed_out": False})
        case SignalTimedOut():
            return state.model_copy(update={"timed_out": True})
    return state


def _decide_register(command: RegisterMarket, state: MarketState) -> list[Event]:
    wanted = command.deadline_ms or (
        REAL_TIME_DEADLINE_MS if command.kind == "real_time" else DAY_AHEAD_DEADLINE_MS
    )
    if state.registered:
        if (state.kind, state.deadline_ms) == (command.kind, wanted):
            return []
        raise CommandRejected(
            f"market {command.market_id} is already registered as {state.kind} "
            f"with deadline {state.deadline_ms} ms"
        )
    return [
        MarketRegistered(
            market_id=command.market_id, kind=command.kind, deadline_ms=command.deadline_ms
        )
    ]


def _decide_publish(command: PublishPrice, state: MarketState) -> list[Event]:
    key = _key(command.interval_start)
    known = {k: (v, p) for k, v, p in state.prices}
    received_at = utc(command.issued_at)
    if key not in known:
        if len(known) >= RETAINED_INTERVALS and key < min(known):
            raise CommandRejected(
                f"price for {key} is older than the {RETAINED_INTERVALS} intervals "
                f"market {command.market_id} retains; cannot tell a repeat from a revision"
            )
        return [
            PricePublished(
                market_id=command.market_id,
                interval_start=utc(command.interval_start),
                interval_minutes=command.interval_minutes,
                price_eur_per_mwh=command.price_eur_per_mwh,
                version=command.version,
                received_at=received_at,
            )
        ]
    version, price = known[key]
    if price == command.price_eur_per_mwh and command.version <= version:
        return []
    if command.version <= version:
        raise CommandRejected(
            f"conflicting price for {key} on market {command.market_id}: version "
            f"{command.version} says {command.price_eur_per_mwh} EUR/MWh but version "
            f"{version} already says {price} EUR/MWh; a revision needs a higher version"
        )
    return [
        PriceRevised(
            market_id=command.market_id,
            interval_start=utc(command.interval_start),
            interval_minutes=command.interval_minutes,
            old_price_eur_per_mwh=price,
            new_price_eur_per_mwh=command.price_eur_per_mwh,
            old_version=version,
            version=command.version,
            received_at=received_at,
        )
    ]


def _decide_deadline(command: CheckFeedDeadline, state: MarketState) -> list[Event]:
    if state.timed_out or state.last_price_at is None:
        return []
    silent_ms = (utc(command.now) - state.last_price_at).total_seconds() * 1000.0
    if silent_ms <= state.deadline_ms:
        return []
    return [
        SignalTimedOut(
            market_id=command.market_id,
            last_price_at=state.last_price_at,
            detected_at=utc(command.now),
            deadline_ms=state.deadline_ms,
        )
    ]


def decide(
    command: RegisterMarket | PublishPrice | CheckFeedDeadline, state: MarketState
) -> list[Event]:
    if isinstance(command, RegisterMarket):
        return _decide_register(command, state)
    if not state.registered:
        raise UnknownEntity(f"market {command.market_id} is not registered")
    if isinstance(command, PublishPrice):
        return _decide_publish(command, state)
    return _decide_deadline(command, state)


MARKET: Decider[MarketState] = Decider(
    kind="market",
    command_types=(RegisterMarket, PublishPrice, CheckFeedDeadline),
    state_type=MarketState,
    initial_state=initial_state,
    evolve=evolve,
    decide=decide,
)

__all__ = ["MARKET", "RETAINED_INTERVALS", "MarketState", "decide", "evolve", "initial_state"]
