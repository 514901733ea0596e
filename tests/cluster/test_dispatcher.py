"""Site dispatchers and their coordinator on a real local Ray, through the real hosts."""

from __future__ import annotations

import pickle
import time
from datetime import UTC, datetime, timedelta

import pytest
import ray

from actors.dispatch import ConfigureDispatcher, IssueSetpoints, RecordOrphanedDecision
from actors.vehicle import (
    GrantControl,
    PlugIn,
    RegisterVehicle,
    ReportTelemetry,
    ReportTelemetryBatch,
    RequestSetpoint,
    RequestSetpoints,
)
from cluster.dispatcher import (
    DISPATCHER_CONCURRENCY,
    SiteDispatcher,
    embedded_fleet,
    start_coordinator,
    start_dispatchers,
    stop_all,
)
from cluster.runtime import _OnePickle, _packed
from events.dispatch import TransformerLimit
from events.market import PublishPrice, RegisterMarket

pytestmark = pytest.mark.ray

SITES = {"site-a": 4, "site-b": 2}


def plugged_in_van(site: str, i: int, now: datetime) -> list:
    """Register van `<site>-ev<i>`, plug it into `<site>-cp<i>` and report 80 % SoC."""
    vid = f"{site}-ev{i}"
    return [
        RegisterVehicle(
            command_id=f"reg-{vid}", issued_at=now, vehicle_id=vid, model="Kia Niro", site_id=site
        ),
        PlugIn(
            command_id=f"plug-{vid}",
            issued_at=now,
            vehicle_id=vid,
            charger_id=f"{site}-cp{i}",
            charger_max_charge_kw=11,
            charger_max_discharge_kw=11,
        ),
        ReportTelemetry(
            command_id=f"tel-{vid}",
            issued_at=now,
            vehicle_id=vid,
            measured_at=now,
            soc=0.8,
            battery_temp_c=25,
            soh=0.95,
        ),
    ]


def wait_until(check, timeout_s: float = 20.0, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


@pytest.fixture(scope="module")
def system(ray_session, tmp_path_factory):
    fleet = embedded_fleet(str(tmp_path_factory.mktemp("dispatch")), name="dsp")
    now = datetime.now(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    commands = [
        RegisterMarket(command_id="m", issued_at=now, market_id="nl-day-ahead", kind="day_ahead")
    ]
    # Prices fall through the horizon: selling now is what the plan does.
    commands += [
        PublishPrice(
            command_id=f"p-{h}",
            issued_at=now,
            market_id="nl-day-ahead",
            interval_start=day + timedelta(hours=h),
            interval_minutes=60,
            price_eur_per_mwh=500.0 - 10 * h,
            version=0,
        )
        for h in range(48)
    ]
    for site, count in SITES.items():
        for i in range(count):
            commands += plugged_in_van(site, i, now)
    assert all(r.ok for r in fleet.send_many(commands))
    configs = [
        ConfigureDispatcher(
            command_id=f"cfg-{site}",
            issued_at=now,
            site_id=site,
            transformers=(TransformerLimit(transformer_id="t1", import_kw=100, export_kw=100),),
            watchdog_timeout_s=1.5,
            lease_s=60,
        )
        for site in SITES
    ]
    dispatchers = start_dispatchers(fleet.runtime, configs, loop_period_s=0.4)
    coordinator = start_coordinator(dispatchers, period_s=0.3)
    yield fleet, dispatchers, coordinator
    stop_all(dispatchers, coordinator)
    fleet.close()


def discharging(fleet, site):
    states = [fleet.state("vehicle", f"{site}-ev{i}") for i in range(SITES[site])]
    return all(s.setpoint is not None and s.setpoint.power_kw < 0 for s in states) and states


def test_each_site_dispatcher_takes_its_vehicles_and_sells_the_peak(system):
    fleet, _, _ = system
    for site in SITES:
        states = wait_until(lambda site=site: discharging(fleet, site))
        assert {s.lease.controller_id for s in states} == {f"dispatch-{site}"}
    # the decision's record is appended beside its setpoints, not before: it may land later
    wait_until(
        lambda: (
            {"DispatchPlanAdopted", "SetpointsIssued"}
            <= {e.type for e in fleet.events("dispatch-site-a")}
        )
    )


def test_a_second_dispatcher_cannot_command_a_vehicle_it_does_not_lease(system):
    fleet, _, _ = system
    wait_until(lambda: discharging(fleet, "site-a"))
    now = datetime.now(UTC)
    grab, sneak = fleet.send_many(
        [
            GrantControl(
                command_id="grab-1",
                issued_at=now,
                vehicle_id="site-a-ev0",
                controller_id="dispatch-site-b",
                lease_until=now + timedelta(minutes=5),
            ),
            RequestSetpoint(
                command_id="sneak-1",
                issued_at=now,
                vehicle_id="site-a-ev0",
                controller_id="dispatch-site-b",
                power_kw=-11,
                valid_until=now + timedelta(minutes=1),
            ),
        ]
    )
    assert grab.event_types == ("VehicleControlRefused",)
    assert sneak.event_types == ("VehicleSetpointRejected",)
    assert fleet.state("vehicle", "site-a-ev0").lease.controller_id == "dispatch-site-a"


def test_a_shards_batch_arrives_as_the_plain_list_of_the_same_commands():
    now = datetime.now(UTC)
    commands = [
        RequestSetpoint(
            command_id=f"dispatch-x:1:ev{i}",
            issued_at=now,
            vehicle_id=f"ev{i}",
            controller_id="dispatch-x",
            power_kw=-1.5 * i,
            valid_until=now + timedelta(minutes=5),
        )
        for i in range(3)
    ]
    arrived = pickle.loads(pickle.dumps(_OnePickle(commands)))
    assert type(arrived) is list and arrived == commands
    # setpoints of one decision travel as columns and expand into the same commands
    packed = pickle.loads(pickle.dumps(_packed(commands)))
    assert type(packed) is RequestSetpoints and packed.commands() == commands
    mixed = [*commands, commands[0].model_copy(update={"command_id": "other"})]
    assert type(_packed(mixed)) is _OnePickle


def test_a_frequency_dip_reaches_every_vehicle_through_the_hosts(system):
    fleet, dispatchers, _ = system
    wait_until(lambda: discharging(fleet, "site-a"))
    # the vehicles already export flat out: an over-frequency (less export) has headroom
    accepted = ray.get(dispatchers["site-a"].grid_signal.remote(50.15))
    assert accepted == SITES["site-a"]
    types = [e.type for e in fleet.events("dispatch-site-a")]
    assert "GridSignalRecorded" in types and "FrequencyResponseIssued" in types


def test_coordinator_splits_a_fleet_target_by_connected_power(system):
    _, _, coordinator = system
    shares = ray.get(coordinator.split.remote(-30.0))
    assert shares["site-a"] == pytest.approx(-20.0) and shares["site-b"] == pytest.approx(-10.0)
    ray.get(coordinator.split.remote(None))


def test_emergency_stop_puts_a_sites_vehicles_at_zero(system):
    fleet, dispatchers, _ = system
    wait_until(lambda: discharging(fleet, "site-b"))
    ray.get(dispatchers["site-b"].emergency_stop.remote("test: red button"))
    for i in range(SITES["site-b"]):
        state = fleet.state("vehicle", f"site-b-ev{i}")
        assert state.setpoint is None and "red button" in state.safe_state_reason
    time.sleep(1.0)  # the loop keeps ticking, but grants nothing while stopped
    assert fleet.state("vehicle", "site-b-ev0").lease is None


def test_silence_from_the_coordinator_trips_the_watchdog(system):
    fleet, _, coordinator = system
    wait_until(lambda: discharging(fleet, "site-a"))
    ray.get(coordinator.pause_keep_alive.remote())

    def all_safe():
        states = [fleet.state("vehicle", f"site-a-ev{i}") for i in range(SITES["site-a"])]
        return all(s.setpoint is None and s.safe_state_reason for s in states) and states

    states = wait_until(all_safe, timeout_s=10)
    assert all("watchdog" in s.safe_state_reason for s in states)
    ray.get(coordinator.resume_keep_alive.remote())
    wait_until(lambda: discharging(fleet, "site-a"))  # control granted again


def test_a_decision_continues_the_trace_of_the_event_it_answers(system):
    fleet, _, _ = system
    wait_until(lambda: discharging(fleet, "site-a"))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    now = datetime.now(UTC)
    [reading] = fleet.send_many(
        [
            ReportTelemetry(
                command_id="traced-tel",
                issued_at=now,
                vehicle_id="site-a-ev1",
                measured_at=now,
                soc=0.79,
                battery_temp_c=25,
                soh=0.95,
                traceparent=f"00-{trace_id}-00f067aa0ba902b7-01",
            )
        ]
    )
    assert reading.status == "recorded"

    def traced_decision():
        events = fleet.events("dispatch-site-a")
        return [e for e in events if e.position > reading.positions[-1] and trace_id in e.metadata]

    [first, *_] = wait_until(traced_decision)  # the next decision's own record carries it
    assert first.command_id.startswith("dispatch-site-a")


def test_a_restarted_dispatcher_records_a_lost_decision_and_does_not_reuse_its_number(system):
    fleet, _, _ = system
    site, vids = "site-c", ("site-c-ev0", "site-c-ev1")
    now = datetime.now(UTC)
    commands = [c for i in range(len(vids)) for c in plugged_in_van(site, i, now)]
    assert all(r.ok for r in fleet.send_many(commands))
    config = ConfigureDispatcher(
        command_id=f"cfg-{site}",
        issued_at=now,
        site_id=site,
        transformers=(TransformerLimit(transformer_id="t1", import_kw=100, export_kw=100),),
        lease_s=60,
    )
    # not started: no loop, each step ticked here with its own time
    first = SiteDispatcher(fleet.runtime, site, config)
    first.tick(now + timedelta(seconds=1))
    first.set_target(-8.0)
    crashed = first.policy.tick(now + timedelta(seconds=2))
    [lost] = [c for c in crashed.dispatch if isinstance(c, IssueSetpoints)]
    # the crash between the appends: the vehicles' made it, the decision's record did not
    first.send([c for c in crashed.dispatch if c is not lost] + crashed.vehicle)
    asked = {c.vehicle_id: c.power_kw for c in crashed.vehicle if isinstance(c, RequestSetpoint)}
    assert asked

    restarted = SiteDispatcher(fleet.runtime, site, config)  # folds the same log
    assert restarted.status()["decision_seq"] == lost.decision_seq - 1
    restarted.set_target(-4.0)
    decision = restarted.tick(now + timedelta(seconds=3))
    *orphans, issued = [
        c for c in decision.dispatch if isinstance(c, RecordOrphanedDecision | IssueSetpoints)
    ]
    # the lost one, found by its vehicles' events; then the numbers the crashed
    # dispatcher may still have had in flight, none of them reused either
    assert [o.decision_seq for o in orphans] == [
        lost.decision_seq + k for k in range(DISPATCHER_CONCURRENCY)
    ]
    assert orphans[0].vehicle_ids == tuple(sorted(asked))
    assert all(not o.vehicle_ids and "in flight" in o.reason for o in orphans[1:])
    assert isinstance(issued, IssueSetpoints)
    assert issued.decision_seq == lost.decision_seq + DISPATCHER_CONCURRENCY
    assert not restarted.results  # nothing rejected
    new_kw = {s.vehicle_id: s.power_kw for s in issued.setpoints}
    assert any(abs(new_kw[v] - asked[v]) > 1.0 for v in asked)
    for vid, power_kw in new_kw.items():
        assert fleet.state("vehicle", vid).setpoint.power_kw == pytest.approx(power_kw)
        [accepted] = [
            e.event()
            for e in fleet.events(f"vehicle-{vid}")
            if e.command_id == f"dispatch-{site}:{issued.decision_seq}:{vid}"
        ]
        assert accepted.power_kw == pytest.approx(power_kw)
    types = [e.type for e in fleet.events(f"dispatch-{site}")]
    assert types.count("OrphanedDecisionRecorded") == DISPATCHER_CONCURRENCY
    assert restarted.status()["decision_seq"] == issued.decision_seq


def test_readings_sent_together_cross_ray_as_one_batch_a_shard_and_are_recorded(system):
    fleet, _, _ = system
    now = datetime.now(UTC)
    vans = [f"{site}-ev{i}" for site, count in SITES.items() for i in range(count)]
    readings = [
        ReportTelemetry(
            command_id=f"late-reading-{vid}",
            issued_at=now,
            vehicle_id=vid,
            measured_at=now,
            soc=0.8,
            battery_temp_c=26.5,
            soh=0.95,
            source="mqtt",
        )
        for vid in vans
    ]
    packed = pickle.loads(pickle.dumps(_packed(readings)))
    assert type(packed) is ReportTelemetryBatch and packed.commands() == readings
    unknown = readings[0].model_copy(update={"command_id": "r-x", "vehicle_id": "nobody"})

    results = fleet.send_many([*readings, unknown])  # a batch per shard, through the twin

    assert [r.status for r in results] == ["recorded"] * len(vans) + ["rejected"]
    assert "not registered" in results[-1].reason
    for vid, result in zip(vans, results, strict=False):
        assert "VehicleTelemetryReported" in result.event_types
        assert fleet.state("vehicle", vid).reading.battery_temp_c == 26.5
    again = fleet.send_many(readings)
    assert all(r.duplicate for r in again) and [r.positions for r in again] == [
        r.positions for r in results[:-1]
    ]
