"""The charger decider: given events, when a command, then events. No Ray, no network."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.charger import (
    CHARGER,
    OCPP_GATEWAY,
    MarkOffline,
    MarkOnline,
    RecordBoot,
    RecordConnectionRejected,
    RecordHeartbeat,
    RecordMeterValues,
    RecordSetpointSent,
    RecordStatus,
    RecordTransactionEvent,
    RegisterCharger,
)
from actors.decider import CommandRejected, UnknownEntity
from events.base import Command, Event
from events.charger import (
    ChargerBooted,
    ChargerCameOnline,
    ChargerMeterValuesRecorded,
    ChargerPowerDivergenceCleared,
    ChargerPowerDivergenceDetected,
    ChargerRegistered,
    ChargerSetpointSent,
    ChargerWentOffline,
    ChargingTransactionEnded,
    ChargingTransactionStarted,
    ConnectorStatusChanged,
    OcppConnectionRejected,
)

T0 = dt.datetime(2030, 1, 1, 17, 0, tzinfo=dt.UTC)
_n = 0


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def cmd(kind: type[Command], seconds: float = 0, **fields: Any) -> Any:
    global _n
    _n += 1
    fields.setdefault("charger_id", "CS-1")
    return kind(command_id=f"c{_n}", issued_at=at(seconds), **fields)


REGISTERED = ChargerRegistered(
    charger_id="CS-1",
    site_id="depot",
    max_charge_kw=11.0,
    max_discharge_kw=11.0,
    ocpp_version="2.1",
    divergence_tolerance_kw=1.0,
    divergence_tolerance_ratio=0.1,
    divergence_samples=3,
)


def when(given_events: list[Event], command: Command) -> list[Event]:
    return CHARGER.decide(command, CHARGER.fold("CS-1", given_events))


def setpoint(power_kw: float, until_s: float = 3600) -> ChargerSetpointSent:
    return ChargerSetpointSent(
        evse_id=1, power_kw=power_kw, valid_until=at(until_s), profile_id=7101, accepted_at=T0
    )


def metered(power_kw: float, seconds: float) -> RecordMeterValues:
    return cmd(RecordMeterValues, seconds, evse_id=1, sampled_at=at(seconds), power_kw=power_kw)


def run_samples(history: list[Event], powers: list[float]) -> list[list[Event]]:
    """Feed samples one by one (deciding, then evolving), returning what each produced."""
    produced = []
    for i, power in enumerate(powers, start=1):
        events = when(history, metered(power, i * 10))
        history = [*history, *events]
        produced.append(events)
    return produced


def test_registration_is_idempotent_and_conflicts_are_refused() -> None:
    register = cmd(
        RegisterCharger,
        site_id="depot",
        max_charge_kw=11.0,
        max_discharge_kw=11.0,
        ocpp_version="2.1",
    )
    assert when([], register) == [REGISTERED]
    assert when([REGISTERED], register) == []
    with pytest.raises(CommandRejected, match="already registered"):
        when([REGISTERED], register.model_copy(update={"max_charge_kw": 22.0}))
    with pytest.raises(CommandRejected, match=r"2\.0\.1 station cannot discharge"):
        when([], register.model_copy(update={"ocpp_version": "2.0.1"}))


def test_an_unregistered_charger_refuses_device_facts() -> None:
    with pytest.raises(UnknownEntity):
        when([], cmd(RecordHeartbeat))


def test_boot_status_and_transaction_facts() -> None:
    boot = cmd(RecordBoot, vendor="v", model="m", reason="PowerUp", ocpp_version="2.1")
    (booted,) = when([REGISTERED], boot)
    assert isinstance(booted, ChargerBooted) and booted.booted_at == T0

    occupied = cmd(RecordStatus, evse_id=1, connector_id=1, status="Occupied", reported_at=T0)
    (changed,) = when([REGISTERED], occupied)
    assert isinstance(changed, ConnectorStatusChanged)
    assert when([REGISTERED, changed], occupied) == []  # already occupied

    def tx(event_type: str, seq_no: int) -> RecordTransactionEvent:
        return cmd(
            RecordTransactionEvent,
            event_type=event_type,
            transaction_id="tx-1",
            seq_no=seq_no,
            evse_id=1,
            trigger_reason="CablePluggedIn",
            reported_at=T0,
        )

    (started,) = when([REGISTERED], tx("Started", 0))
    assert isinstance(started, ChargingTransactionStarted)
    assert when([REGISTERED, started], tx("Started", 0)) == []
    (ended,) = when([REGISTERED, started], tx("Ended", 5))
    assert isinstance(ended, ChargingTransactionEnded)
    assert when([REGISTERED, started, ended], tx("Ended", 5)) == []


def test_a_stale_or_repeated_meter_sample_adds_nothing() -> None:
    (recorded,) = when([REGISTERED], metered(5.0, 10))
    assert isinstance(recorded, ChargerMeterValuesRecorded)
    assert when([REGISTERED, recorded], metered(5.0, 10)) == []
    assert when([REGISTERED, recorded], metered(5.0, 5)) == []


def test_divergence_is_detected_once_after_three_samples_and_cleared_when_back() -> None:
    # setpoint -7 kW (discharge); tolerance max(1 kW, 10 % of 7 kW) = 1 kW
    produced = run_samples([REGISTERED, setpoint(-7.0)], [-4.0, -4.0, -4.0, -4.0, -6.5])
    kinds = [[type(e) for e in events] for events in produced]
    assert kinds[0] == kinds[1] == [ChargerMeterValuesRecorded]
    assert kinds[2] == [ChargerMeterValuesRecorded, ChargerPowerDivergenceDetected]
    assert kinds[3] == [ChargerMeterValuesRecorded]  # detected once, not per sample
    assert kinds[4] == [ChargerMeterValuesRecorded, ChargerPowerDivergenceCleared]
    detected = produced[2][1]
    assert isinstance(detected, ChargerPowerDivergenceDetected)
    assert (detected.setpoint_kw, detected.metered_kw, detected.samples) == (-7.0, -4.0, 3)
    assert detected.tolerance_kw == pytest.approx(1.0)


def test_the_tolerance_grows_with_the_setpoint_and_a_good_sample_resets_the_count() -> None:
    # setpoint 22 kW: tolerance 2.2 kW, so 20.5 kW is fine
    assert run_samples([REGISTERED, setpoint(22.0)], [20.5] * 4)[-1][1:] == []
    produced = run_samples([REGISTERED, setpoint(22.0)], [15.0, 15.0, 21.0, 15.0, 15.0])
    assert all(len(events) == 1 for events in produced)


def test_no_divergence_without_a_setpoint_in_force() -> None:
    assert all(len(e) == 1 for e in run_samples([REGISTERED], [0.0, 9.0, 9.0, 9.0]))
    expired = setpoint(-7.0, until_s=5)  # samples come at 10 s, 20 s, ...
    assert all(len(e) == 1 for e in run_samples([REGISTERED, expired], [0.0] * 4))


def test_setpoints_repeat_as_nothing_and_a_201_charger_cannot_discharge() -> None:
    sent = cmd(RecordSetpointSent, evse_id=1, power_kw=-7.0, valid_until=at(3600), profile_id=7101)
    (event,) = when([REGISTERED], sent)
    assert isinstance(event, ChargerSetpointSent)
    assert when([REGISTERED, event], sent) == []
    old = REGISTERED.model_copy(update={"ocpp_version": "2.0.1", "max_discharge_kw": 0.0})
    with pytest.raises(CommandRejected, match="no discharge"):
        when([old], sent)


def test_offline_and_online_are_transitions() -> None:
    online = cmd(MarkOnline)
    (came,) = when([REGISTERED], online)
    assert isinstance(came, ChargerCameOnline)
    assert when([REGISTERED, came], online) == []
    offline = cmd(MarkOffline, 30, last_seen_at=at(0))
    (went,) = when([REGISTERED, came], offline)
    assert isinstance(went, ChargerWentOffline) and went.detected_at == at(30)
    assert when([REGISTERED, came, went], offline) == []


def test_the_gateway_stream_records_and_counts_rejections() -> None:
    rejected = RecordConnectionRejected(
        command_id="g:1",
        issued_at=T0,
        gateway_id="csms",
        station_id="CS-9",
        http_status=404,
        reason="unknown station 'CS-9'",
    )
    assert rejected.stream_id == "ocpp-gateway-csms"
    (event,) = OCPP_GATEWAY.decide(rejected, OCPP_GATEWAY.initial_state("csms"))
    assert isinstance(event, OcppConnectionRejected)
    assert OCPP_GATEWAY.fold("csms", [event, event]).connections_rejected == 2


@settings(max_examples=60, deadline=None)
@given(
    powers=st.lists(st.floats(-11, 11, allow_nan=False), min_size=1, max_size=8),
    setpoint_kw=st.one_of(st.none(), st.floats(-11, 11, allow_nan=False)),
)
def test_deciding_a_meter_sample_twice_adds_nothing(
    powers: list[float], setpoint_kw: float | None
) -> None:
    history: list[Event] = (
        [REGISTERED] if setpoint_kw is None else [REGISTERED, setpoint(setpoint_kw)]
    )
    for i, power in enumerate(powers, start=1):
        sample = metered(power, i * 10)
        events = when(history, sample)
        history = [*history, *events]
        assert when(history, sample) == []
