"""The ROI inputs: one TOML file, validated into frozen pydantic models.

Every section forbids unknown keys, so a typo (``discount_rat``) is an error, not a
silently ignored input. :func:`load_roi_config` turns pydantic's errors into one
``RoiConfigError`` whose message names each bad key by its dotted path with the value
that was given, e.g. ``finance.discount_rate = 1.5: must be less than or equal to 1``.

Money in EUR, rates as fractions (0.07 = 7 %), time in years.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "BatteryConfig",
    "CapexConfig",
    "FinanceConfig",
    "MonteCarloConfig",
    "OpexConfig",
    "RevenueConfig",
    "RoiConfig",
    "RoiConfigError",
    "SeasonalWeights",
    "load_roi_config",
    "parse_roi_config",
]

NonNegativeEur = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
# A yearly figure: one number for every year, or one number per year of the horizon.
YearlyEur = NonNegativeEur | list[NonNegativeEur]
YearlyFraction = Fraction | list[Fraction]


class RoiConfigError(ValueError):
    """The ROI config file is unreadable or invalid; the message lists every problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CapexConfig(_Section):
    """One-off investment at year 0."""

    charger_count: Annotated[int, Field(ge=0)]
    charger_unit_eur: NonNegativeEur
    inverter_count: Annotated[int, Field(ge=0)] = 0
    inverter_unit_eur: NonNegativeEur = 0.0
    installation_eur: NonNegativeEur
    other_eur: NonNegativeEur = 0.0

    @property
    def total_eur(self) -> float:
        return (
            self.charger_count * self.charger_unit_eur
            + self.inverter_count * self.inverter_unit_eur
            + self.installation_eur
            + self.other_eur
        )


class OpexConfig(_Section):
    """Running costs, paid every year from year 1."""

    yearly_eur: NonNegativeEur
    escalation_rate: Annotated[float, Field(ge=-0.5, le=1.0, allow_inf_nan=False)] = 0.0


class BatteryConfig(_Section):
    """Battery wear caused by V2G, charged to the project as a yearly cost.

    The cost is ``vehicles x replacement cost x V2G fade / end-of-life fade``: the pack
    is written off linearly in capacity (see ``projections.degradation``).
    """

    vehicle_count: Annotated[int, Field(ge=0)]
    replacement_cost_eur: NonNegativeEur
    eol_fade: Annotated[float, Field(gt=0.0, le=1.0)] = 0.20
    v2g_fade_per_year: YearlyFraction


class SeasonalWeights(_Section):
    """Share of a year's price-driven revenue earned in each season; must sum to 1."""

    winter: Fraction
    spring: Fraction
    summer: Fraction
    autumn: Fraction

    @model_validator(mode="after")
    def _sums_to_one(self) -> Self:
        total = self.winter + self.spring + self.summer + self.autumn
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"seasonal weights must sum to 1, they sum to {total:g}")
        return self

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.winter, self.spring, self.summer, self.autumn)


class RevenueConfig(_Section):
    """Expected yearly revenue by stream (later fed from the revenue projection).

    Arbitrage and regulation follow market prices; peak shaving is avoided demand
    charges from the site tariff, so price volatility does not move it.
    """

    arbitrage_eur: YearlyEur
    regulation_eur: YearlyEur
    peak_shaving_eur: YearlyEur

    def streams(self) -> dict[str, float | list[float]]:
        return {
            "arbitrage": self.arbitrage_eur,
            "regulation": self.regulation_eur,
            "peak_shaving": self.peak_shaving_eur,
        }


class FinanceConfig(_Section):
    discount_rate: Annotated[float, Field(gt=-1.0, le=1.0, allow_inf_nan=False)]
    horizon_years: Annotated[int, Field(ge=1, le=50)] = 10


class MonteCarloConfig(_Section):
    """Uncertainty for the Monte Carlo; all zero volatility gives the deterministic case.

    ``price_volatility`` is the standard deviation of the log of each season's price
    level (independent draws per season and year, mean 1). ``availability_mean`` is the
    share of the fleet plugged in and willing when the plan expects it (revenue is
    quoted at that share); ``availability_sd`` its spread from year to year.
    ``degradation_sd`` is the log-sd of a multiplier on the wear cost, drawn once per
    iteration: a model error persists over the whole horizon.
    """

    iterations: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    seed: Annotated[int, Field(ge=0)] = 0
    price_volatility: Annotated[float, Field(ge=0.0, le=3.0)] = 0.0
    availability_mean: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    availability_sd: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    degradation_sd: Annotated[float, Field(ge=0.0, le=3.0)] = 0.0


class RoiConfig(_Section):
    capex: CapexConfig
    opex: OpexConfig
    battery: BatteryConfig
    revenue: RevenueConfig
    seasonal_weights: SeasonalWeights
    finance: FinanceConfig
    monte_carlo: MonteCarloConfig = MonteCarloConfig()

    @model_validator(mode="after")
    def _yearly_lists_match_horizon(self) -> Self:
        horizon = self.finance.horizon_years
        yearly = {f"revenue.{k}_eur": v for k, v in self.revenue.streams().items()}
        yearly["battery.v2g_fade_per_year"] = self.battery.v2g_fade_per_year
        for key, value in yearly.items():
            if isinstance(value, list) and len(value) != horizon:
                raise ValueError(
                    f"{key} has {len(value)} yearly values but finance.horizon_years = "
                    f"{horizon}; give one number or exactly {horizon}"
                )
        return self


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (value {error['input']!r}); check the spelling"
    if error["type"] == "missing":
        return f"{where}: required key is missing"
    return f"{where} = {error['input']!r}: {error['msg']}"


def parse_roi_config(data: dict[str, Any], source: str = "config") -> RoiConfig:
    """Validate already-parsed TOML data.

    Raises:
        RoiConfigError: listing every invalid, missing or unknown key with its value.
    """
    try:
        return RoiConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors(include_url=False)]
        raise RoiConfigError(f"invalid ROI config {source}:\n  " + "\n  ".join(lines)) from None


def load_roi_config(path: str | Path) -> RoiConfig:
    """Read and validate a TOML ROI config.

    Example:
        >>> cfg = load_roi_config("projections/roi_example.toml")  # doctest: +SKIP
        >>> cfg.finance.horizon_years  # doctest: +SKIP
        10

    Raises:
        RoiConfigError: the file is missing, is not valid TOML, or fails validation.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise RoiConfigError(f"cannot read ROI config {path.name}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RoiConfigError(f"ROI config {path.name} is not valid TOML: {exc}") from exc
    return parse_roi_config(data, source=path.name)
