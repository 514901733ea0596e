"""Commands and events of a market price feed (day-ahead or real-time)."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, Field

from events.base import Command, Event

MarketKind = Literal["day_ahead", "real_time"]


class _MarketCommand(Command):
    market_id: str = Field(min_length=1, max_length=100)

    @property
    def stream_id(self) -> str:
        return f"market-{self.market_id}"


class RegisterMarket(_MarketCommand):
    """Start following a feed; `deadline_ms` defaults to 500 for real-time markets."""

    kind: MarketKind
    deadline_ms: int | None = Field(default=None, gt=0)
    currency: Literal["EUR"] = "EUR"


class PublishPrice(_MarketCommand):
    interval_start: AwareDatetime
    interval_minutes: int = Field(gt=0, le=1440)
    price_eur_per_mwh: float = Field(allow_inf_nan=False)
    version: int = Field(ge=0)


class CheckFeedDeadline(_MarketCommand):
    now: AwareDatetime


class MarketRegistered(Event):
    market_id: str
    kind: MarketKind
    deadline_ms: int | None


class PricePublished(Event):
    market_id: str
    interval_start: AwareDatetime
    interval_minutes: int
    price_eur_per_mwh: float
    version: int
    received_at: AwareDatetime


class PriceRevised(Event):
    market_id: str
    interval_start: AwareDatetime
    interval_minutes: int
    old_price_eur_per_mwh: float
    new_price_eur_per_mwh: float
    old_version: int
    version: int
    received_at: AwareDatetime


class SignalTimedOut(Event):
    market_id: str
    last_price_at: AwareDatetime | None
    detected_at: AwareDatetime
    deadline_ms: int


__all__ = [
    "CheckFeedDeadline",
    "MarketKind",
    "MarketRegistered",
    "PricePublished",
    "PriceRevised",
    "PublishPrice",
    "RegisterMarket",
    "SignalTimedOut",
]
