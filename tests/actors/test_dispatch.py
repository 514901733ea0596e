"""The dispatcher: its decider (given/when/then), its policy's arithmetic, and stories in
which its commands go through the real vehicle decider (hosts on a local log, no Ray)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given as hyp_given
from hypothesis import settings
from hypothesis import strategies as st

from actors.decider import CommandRejected
from actors.dispatch import (
    DISPATCH,
    ConfigureDispatcher,
    IssueSetpoints,
    RecordOrphanedDecision,
    SitePolicy,
    VehicleView,
    allocate,
    arm_response,
    decide,
    discharge_order,
    droop_export_kw,
    enforce_transformers,
    evolve,
    initial_state,
    split_by_headroom,
    transformer_loads_kw,
)
from actors.host import EntityHost
from actors.market import MARKET
from actors.vehicle import (
    VEHICLE,
    EnforceSafeState,
    GrantControl,
    PlanTrip,
    PlugIn,
    RegisterVehicle,
    ReportTelemetry,
    RequestSetpoint,
)
from events.dispatch import TransformerLimit, VehicleSetpoint
from events.log import EventLog
from events.market import PublishPrice, RegisterMarket

T0 = datetime(2024, 3, 12, 0, 0, tzinfo=UTC)
SITE = "depot-a"
ROWS = [
    "position",
    "stream_id",
    "stream_version",
    "type",
    "schema_version",
    "payload",
    "command_id",
]


def t(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def configure(**overrides) -> ConfigureDispatcher:
    fields = {
        "command_id": "cfg-1",
        "issued_at": T0,
        "site_id": SITE,
        "transformers": (TransformerLimit(transformer_id="tr-1", import_kw=200, export_kw=200),),
    }
    return ConfigureDispatcher(**{**fields, **overrides})


def given(*commands):
    state = initial_state(SITE)
    for command in commands:
        for event in decide(command, state):
            state = evolve(state, event)
    return state


# --------------------------------------------------------------------------- the decider


def test_configuring_twice_with_the_same_settings_records_once():
    state = given(configure())
    assert state.config is not None and state.config.droop == 0.05
    assert state.config.deadband_hz == 0.036 and state.config.trip_low_hz == 47.5
    assert decide(configure(command_id="cfg-2"), state) == []


def test_decisions_are_numbered_without_gaps_and_a_repeat_adds_nothing():
    state = given(configure())
    issue = IssueSetpoints(
        command_id="d-1",
        issued_at=T0,
        site_id=SITE,
        decision_seq=1,
        kind="plan",
        valid_until=t(15),
        setpoints=(VehicleSetpoint(vehicle_id="v1", power_kw=-3.0),),
    )
    [event] = decide(issue, state)
    after = evolve(state, event)
    assert after.decision_seq == 1
    assert decide(issue, after) == []
    with pytest.raises(CommandRejected, match="skips ahead"):
        decide(issue.model_copy(update={"decision_seq": 3}), after)


def orphaned(seq: int, command_id: str = "o") -> RecordOrphanedDecision:
    return RecordOrphanedDecision(
        command_id=command_id,
        issued_at=T0,
        site_id=SITE,
        decision_seq=seq,
        vehicle_ids=("v1",),
        reason="lost between the appends",
    )


def test_an_orphaned_decision_takes_exactly_the_next_seq_and_the_next_decision_the_one_after():
    state = given(configure())
    with pytest.raises(CommandRejected, match="skips ahead"):
        decide(orphaned(2), state)
    [event] = decide(orphaned(1), state)
    assert type(event).__name__ == "OrphanedDecisionRecorded"
    assert event.decision_seq == 1 and event.vehicle_ids == ("v1",)
    after = evolve(state, event)
    assert after.decision_seq == 1
    assert decide(orphaned(1, "o-again"), after) == []  # recorded once
    issue = IssueSetpoints(
        command_id="d",
        issued_at=T0,
        site_id=SITE,
        decision_seq=1,
        kind="plan",
        valid_until=t(15),
        setpoints=(VehicleSetpoint(vehicle_id="v1", power_kw=-3.0),),
    )
    assert decide(issue, after) == []  # its number is taken
    assert decide(issue.model_copy(update={"decision_seq": 2}), after) != []


def test_during_an_emergency_stop_only_zero_setpoints_are_recorded():
    policy = SitePolicy(SITE)
    policy.state = given(configure())
    policy.emergency_stop(T0, "operator pressed the button")
    discharge = IssueSetpoints(
        command_id="d-2",
        issued_at=T0,
        site_id=SITE,
        decision_seq=2,
        kind="plan",
        valid_until=t(15),
        setpoints=(VehicleSetpoint(vehicle_id="v1", power_kw=-3.0),),
    )
    with pytest.raises(CommandRejected, match="emergency stop"):
        decide(discharge, policy.state)


def test_an_unconfigured_site_is_unknown():
    with pytest.raises(CommandRejected, match="not configured"):
        decide(
            IssueSetpoints(
                command_id="x",
                issued_at=T0,
                site_id=SITE,
                decision_seq=1,
                kind="plan",
                valid_until=t(1),
                setpoints=(),
            ),
            initial_state(SITE),
        )


def test_the_decider_is_registered_like_any_entity_kind():
    assert DISPATCH.kind == "dispatch"
    assert DISPATCH.stream_id(SITE) == "dispatch-depot-a"
    assert configure().stream_id == "dispatch-depot-a"


# --------------------------------------------------------------------------- droop


@pytest.mark.parametrize(
    ("frequency_hz", "droop", "deadband_hz", "expected_kw"),
    [
        (50.0, 0.05, 0.036, 0.0),
        (50.036, 0.05, 0.036, 0.0),  # on the deadband edge: nothing yet
        (49.97, 0.05, 0.036, 0.0),
        # (0.2 - 0.036) Hz / (0.05 x 50 Hz) x 100 kW = 6.56 kW more export
        (49.8, 0.05, 0.036, 6.56),
        # over-frequency: (0.5 - 0.036) / 2.5 x 100 = 18.56 kW less export (more import)
        (50.5, 0.05, 0.036, -18.56),
        # 4 % droop, 17 mHz deadband: (0.1 - 0.017) / (0.04 x 50) x 100 = 4.15 kW
        (49.9, 0.04, 0.017, 4.15),
    ],
)
def test_droop_matches_hand_computed_values(frequency_hz, droop, deadband_hz, expected_kw):
    got = droop_export_kw(frequency_hz, 100.0, 50.0, droop, deadband_hz)
    assert got == pytest.approx(expected_kw, abs=1e-9)


# --------------------------------------------------------------------------- allocation


def view(vid: str, **fields) -> VehicleView:
    base = {
        "vehicle_id": vid,
        "transformer_id": "tr-1",
        "charger_id": f"cp-{vid}",
        "soc": 0.6,
        "capacity_kwh": 60.0,
        "efficiency": 0.9,
        "soc_floor": 0.2,
        "rated_charge_kw": 11.0,
        "rated_discharge_kw": 11.0,
        "max_charge_kw": 11.0,
        "max_discharge_kw": 11.0,
        "charge_room_kwh": 30.0,
        "discharge_room_kwh": 20.0,
        "cycles": 10.0,
        "departure_at": None,
        "departure_energy_kwh": 0.0,
        "controlled": True,
        "foreign": False,
    }
    return VehicleView(**{**base, **fields})


def test_discharge_comes_first_from_the_highest_soc_then_the_fewest_cycles():
    views = {
        "low": view("low", soc=0.4),
        "high-worn": view("high-worn", soc=0.9, cycles=300),
        "high-fresh": view("high-fresh", soc=0.9, cycles=20),
    }
    assert [v.vehicle_id for v in discharge_order(views.values())] == [
        "high-fresh",
        "high-worn",
        "low",
    ]
    power = dict.fromkeys(views, 0.0)
    moved = allocate(15.0, power, views, hours=0.25)
    assert moved == pytest.approx(15.0)
    assert power["high-fresh"] == pytest.approx(-11.0 * (1 - 1e-6))
    assert power["high-worn"] == pytest.approx(-4.0, rel=1e-5)
    assert power["low"] == 0.0


def test_a_degraded_battery_is_left_out_and_a_hot_one_gives_only_its_derated_power():
    views = {
        "degraded": view("degraded", soc=0.95, max_discharge_kw=0.0),  # SoH below threshold
        "hot": view("hot", soc=0.9, max_discharge_kw=5.5),  # 55 °C: derated by half
        "cool": view("cool", soc=0.5),
    }
    power = dict.fromkeys(views, 0.0)
    allocate(30.0, power, views, hours=0.25)
    assert power["degraded"] == 0.0
    assert power["hot"] == pytest.approx(-5.5, rel=1e-5)
    assert power["cool"] == pytest.approx(-11.0, rel=1e-5)


def test_frequency_response_is_split_in_proportion_to_headroom():
    views = {"a": view("a"), "b": view("b", max_discharge_kw=5.0)}
    new = split_by_headroom(8.0, {"a": 0.0, "b": 0.0}, views, hours=0.25)
    # headroom 11 and 5 kW: 8 kW is half of 16, so each gives half its headroom
    assert new["a"] == pytest.approx(-5.5, rel=1e-5)
    assert new["b"] == pytest.approx(-2.5, rel=1e-5)


limits = st.floats(min_value=0.0, max_value=22.0)
rooms = st.floats(min_value=0.0, max_value=80.0)


@settings(max_examples=200, deadline=None)
@hyp_given(
    vehicles=st.lists(
        st.tuples(st.floats(min_value=-22.0, max_value=22.0), limits, rooms, limits, rooms),
        min_size=1,
        max_size=12,
    ),
    export_kw=st.floats(min_value=-200.0, max_value=200.0),
    hours=st.floats(min_value=1e-4, max_value=1.0),
)
def test_the_armed_response_splits_exactly_as_split_by_headroom(vehicles, export_kw, hours):
    views, base = {}, {}
    for i, (base_kw, max_charge, charge_room, max_discharge, discharge_room) in enumerate(vehicles):
        vid = f"v{i:02d}"
        views[vid] = view(
            vid,
            max_charge_kw=max_charge,
            charge_room_kwh=charge_room,
            max_discharge_kw=max_discharge,
            discharge_room_kwh=discharge_room,
        )
        base[vid] = base_kw
    expected = split_by_headroom(export_kw, base, views, hours)
    armed = arm_response(base, views)
    got = dict(zip(armed.vehicle_ids, armed.split(export_kw, hours).tolist(), strict=True))
    assert got.keys() == expected.keys()
    for vid, power_kw in expected.items():
        assert got[vid] == pytest.approx(power_kw, rel=1e-9, abs=1e-9)


def test_discharge_moves_off_a_transformer_near_its_limit():
    transformers = (
        TransformerLimit(transformer_id="busy", import_kw=50, export_kw=10),
        TransformerLimit(transformer_id="quiet", import_kw=50, export_kw=50),
    )
    views = {
        "b1": view("b1", transformer_id="busy", soc=0.9),
        "b2": view("b2", transformer_id="busy", soc=0.8),
        "q1": view("q1", transformer_id="quiet", soc=0.5),
    }
    power = {"b1": -11.0, "b2": -11.0, "q1": 0.0}
    enforce_transformers(power, views, transformers, hours=0.25)
    loads = transformer_loads_kw(power, views)
    assert -loads["busy"] <= 0.95 * 10 + 1e-9
    # 12.5 kW cut on "busy"; "quiet" takes what its one vehicle can give (11 kW)
    assert power["q1"] == pytest.approx(-11.0, rel=1e-5)
    assert sum(power.values()) == pytest.approx(-9.5 - 11.0, rel=1e-5)


@st.composite
def fleets(draw):
    n = draw(st.integers(1, 8))
    views = {}
    for i in range(n):
        vid = f"v{i}"
        views[vid] = view(
            vid,
            transformer_id=draw(st.sampled_from(["t1", "t2"])),
            soc=draw(st.floats(0, 1)),
            max_charge_kw=draw(st.floats(0, 22)),
            max_discharge_kw=draw(st.floats(0, 22)),
            charge_room_kwh=draw(st.floats(0, 80)),
            discharge_room_kwh=draw(st.floats(0, 80)),
            cycles=draw(st.floats(0, 1000)),
        )
    base = {vid: v.clamp(draw(st.floats(-30, 30)), 0.25) for vid, v in views.items()}
    return views, base, draw(st.floats(-200, 200)), draw(st.floats(-0.5, 0.5))


@settings(max_examples=150, deadline=None)
@hyp_given(fleets())
def test_property_setpoints_never_exceed_vehicle_or_transformer_limits(case):
    views, base, target_kw, freq_delta_hz = case
    hours = 0.25
    transformers = (
        TransformerLimit(transformer_id="t1", import_kw=60, export_kw=40),
        TransformerLimit(transformer_id="t2", import_kw=60, export_kw=40),
    )
    power = dict(base)
    allocate(sum(power.values()) - target_kw, power, views, hours)
    enforce_transformers(power, views, transformers, hours)
    power = {vid: views[vid].clamp(p, hours) for vid, p in power.items()}
    for source in (power, split_by_headroom(target_kw, power, views, hours)):
        for vid, p in source.items():
            v = views[vid]
            assert -v.discharge_limit_kw(hours) - 1e-9 <= p <= v.charge_limit_kw(hours) + 1e-9
    loads = transformer_loads_kw(power, views)
    for tr in transformers:
        # never made worse than where it started, and within the limit when the start was
        start = transformer_loads_kw(base, views).get(tr.transformer_id, 0.0)
        load = loads.get(tr.transformer_id, 0.0)
        assert load <= max(tr.import_kw, start) + 1e-6
        assert -load <= max(tr.export_kw, -start) + 1e-6
    export = droop_export_kw(50 + freq_delta_hz, 100)
    assert export == 0 or (export > 0) == (freq_delta_hz < 0)


# --------------------------------------------------------------------------- stories


class Site:
    """A site on a local log: real vehicle, market and dispatch hosts, one SitePolicy."""

    def __init__(self, tmp_path, vehicles: int = 3, **config) -> None:
        self.log = EventLog(str(tmp_path / "log"), partitions=2)
        self.hosts = {d.kind: EntityHost(d, self.log) for d in (VEHICLE, MARKET, DISPATCH)}
        self.policy = SitePolicy(SITE, watched=config.pop("watched", ()))
        self.send([configure(**config)])
        self.send(
            [
                RegisterMarket(
                    command_id="mkt", issued_at=T0, market_id="nl-day-ahead", kind="day_ahead"
                )
            ]
        )
        self.ids = [f"ev-{i}" for i in range(vehicles)]
        for i, vid in enumerate(self.ids):
            self.send(
                [
                    RegisterVehicle(
                        command_id=f"reg-{vid}",
                        issued_at=T0,
                        vehicle_id=vid,
                        model="Volkswagen ID.4",
                        site_id=SITE,
                    ),
                    PlugIn(
                        command_id=f"plug-{vid}",
                        issued_at=T0,
                        vehicle_id=vid,
                        charger_id=f"cp-{i}",
                        charger_max_charge_kw=11,
                        charger_max_discharge_kw=11,
                    ),
                    ReportTelemetry(
                        command_id=f"tel-{vid}",
                        issued_at=T0,
                        vehicle_id=vid,
                        measured_at=T0,
                        soc=0.7 + 0.05 * i,
                        battery_temp_c=25,
                        soh=0.95,
                    ),
                ]
            )

    def prices(self, hourly: list[float], start: datetime = T0) -> None:
        self.send(
            [
                PublishPrice(
                    command_id=f"p-{k}-{start:%d%H}",
                    issued_at=start,
                    market_id="nl-day-ahead",
                    interval_start=start + timedelta(hours=k),
                    interval_minutes=60,
                    price_eur_per_mwh=p,
                    version=0,
                )
                for k, p in enumerate(hourly)
            ]
        )
        self.sync()

    def send(self, commands):
        results = []
        for command in commands:
            kind = next(
                k for k, h in self.hosts.items() if isinstance(command, h.decider.command_types)
            )
            results.extend(self.hosts[kind].handle([command]))
        return results

    def sync(self) -> None:
        table = self.log.read_all(self.policy.position + 1, columns=ROWS)
        self.policy.apply_rows(table.to_pylist())

    def act(self, decision):
        results = self.send(decision.dispatch) + self.send(decision.vehicle_commands())
        self.sync()
        return results

    def vehicle(self, vid: str):
        return self.hosts["vehicle"].state(vid)

    def restart(self) -> None:
        """A new dispatcher process: a fresh policy folding the same log."""
        self.policy = SitePolicy(SITE, watched=self.policy.watched)
        self.sync()

    def setpoints_in_log(self, seq: int) -> dict[str, float]:
        """Vehicle -> power the vehicles accepted from our decision `seq` (their own events)."""
        rows = self.log.read_all(columns=["type", "command_id", "payload"]).to_pylist()
        prefix = f"{self.policy.controller_id}:{seq}:"
        return {
            r["command_id"][len(prefix) :]: json.loads(r["payload"])["power_kw"]
            for r in rows
            if r["type"] == "VehicleSetpointAccepted" and r["command_id"].startswith(prefix)
        }

    def close(self):
        self.log.close()


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    s.sync()
    yield s
    s.close()


def test_negative_prices_lead_to_charging_not_cycling(site):
    site.prices([-150.0 + 2 * k for k in range(24)])  # most negative first
    site.send(
        [
            ReportTelemetry(
                command_id=f"low-{v}",
                issued_at=T0,
                vehicle_id=v,
                measured_at=t(0.5),
                soc=0.3,
                battery_temp_c=25,
                soh=0.95,
            )
            for v in site.ids
        ]
    )
    site.sync()
    results = site.act(site.policy.tick(t(1)))
    assert all(r.ok for r in results)
    plan = site.policy.plan
    assert plan is not None and (plan.power_kw >= -1e-9).all()  # no discharge, anywhere
    assert plan.power_kw[:, 0].sum() > 0
    for vid in site.ids:
        setpoint = site.vehicle(vid).setpoint
        assert setpoint is not None and setpoint.power_kw > 0


def test_an_evening_peak_is_sold_and_the_plan_states_its_shares(tmp_path):
    site = Site(tmp_path, regulation_share=0.2, peak_shaving_share=0.1)
    site.sync()
    site.prices([300.0 if k < 2 else 20.0 for k in range(24)])
    decision = site.policy.tick(t(1))
    adopted = [c for c in decision.dispatch if type(c).__name__ == "AdoptPlan"]
    assert adopted and adopted[0].regulation_share == 0.2
    assert adopted[0].arbitrage_share == pytest.approx(0.7)
    site.act(decision)
    for vid in site.ids:
        setpoint = site.vehicle(vid).setpoint
        assert setpoint is not None and setpoint.power_kw < 0
        # regulation keeps 20 % of the power as headroom
        assert abs(setpoint.power_kw) <= 11 * 0.8 + 1e-6
    site.close()


def test_a_frequency_dip_exports_more_by_droop_through_the_vehicles(site):
    site.prices([50.0] * 24)
    site.act(site.policy.tick(t(1)))
    before = {v: site.vehicle(v).setpoint for v in site.ids}
    decision = site.policy.on_grid_signal(t(1.1), 49.8)
    results = site.act(decision)
    assert all(r.status == "recorded" for r in results)
    rated_kw = 11.0 * 3  # the ID.4 discharges at 11 kW AC, on 11 kW chargers
    expected = droop_export_kw(49.8, rated_kw)
    after = {v: site.vehicle(v).setpoint.power_kw for v in site.ids}
    exported = sum((before[v].power_kw if before[v] else 0.0) - after[v] for v in site.ids)
    assert exported == pytest.approx(expected, rel=1e-4)
    issued = [c for c in decision.dispatch if type(c).__name__ == "IssueFrequencyResponse"]
    assert issued[0].export_kw == pytest.approx(expected, rel=1e-4)
    # built from columns without validation: each one what validating it gives, named
    # by the decision
    seq = issued[0].decision_seq
    for command in decision.vehicle_commands():
        assert type(command).model_validate(command.model_dump()) == command
        assert command.command_id == f"{site.policy.controller_id}:{seq}:{command.vehicle_id}"


def test_regulation_energy_is_booked_per_vehicle_at_the_tick_not_per_frequency_event(site):
    site.prices([50.0] * 24)
    site.act(site.policy.tick(t(1)))
    dip = site.policy.on_grid_signal(t(1.1), 49.8)
    site.act(dip)
    extra_kw = {v: -site.vehicle(v).setpoint.power_kw for v in site.ids}  # idle base: 0 kW
    # the next event ends the dip's response: its energy waits for the tick
    back = site.policy.on_grid_signal(t(1.4), 50.0)
    assert all(r.ok for r in site.act(back))
    for decision in (dip, back):
        assert not [c for c in decision.dispatch if type(c).__name__ == "RecordRegulationEnergy"]
    assert all(site.vehicle(v).setpoint.power_kw == 0 for v in site.ids)
    tick = site.policy.tick(t(2))
    booked = [c for c in tick.dispatch if type(c).__name__ == "RecordRegulationEnergy"]
    assert sorted(c.vehicle_id for c in booked) == sorted(site.ids)
    for command in booked:  # 0.3 minutes at the extra export
        assert command.energy_kwh == pytest.approx(extra_kw[command.vehicle_id] * 0.3 / 60)
        assert command.price_eur_per_mwh == 50.0 and command.interval_start == t(1.1)
    assert all(r.status == "recorded" for r in site.act(tick))
    assert not [
        c for c in site.policy.tick(t(3)).dispatch if type(c).__name__ == "RecordRegulationEnergy"
    ]


def telemetry(command_id: str, vehicle_id: str, at: datetime, soc: float) -> ReportTelemetry:
    return ReportTelemetry(
        command_id=command_id,
        issued_at=at,
        vehicle_id=vehicle_id,
        measured_at=at,
        soc=soc,
        battery_temp_c=25,
        soh=0.95,
    )


def test_a_plan_solved_ahead_is_adopted_only_for_exactly_its_inputs(site):
    site.prices([400.0 - 10 * k for k in range(24)])
    job = site.policy.plan_job(t(1))
    assert job is not None and [v.vehicle_id for v in job.chosen] == site.ids
    solved = job.solve()
    decision = site.policy.tick(t(1), solved=solved)
    assert any(type(c).__name__ == "AdoptPlan" for c in decision.dispatch)
    assert site.policy.plan.power_kw is solved.power_kw  # adopted, not solved again
    site.act(decision)
    assert site.policy.plan_job(t(1.5)) is None  # nothing to re-plan
    # a re-plan is solved ahead, then another vehicle's SoC moves before the tick
    site.send([telemetry("tel-a", "ev-0", t(2), 0.3)])
    site.sync()
    ahead = site.policy.plan_job(t(2))
    assert ahead is not None
    solved = ahead.solve()
    site.send([telemetry("tel-b", "ev-1", t(2), 0.35)])
    site.sync()
    decision = site.policy.tick(t(2), solved=solved)
    assert any(type(c).__name__ == "AdoptPlan" for c in decision.dispatch)
    assert site.policy.plan.power_kw is not solved.power_kw  # solved again, for the new SoC


def test_over_frequency_alert_throttles_discharge_to_zero(site):
    site.prices([400.0 - 10 * k for k in range(24)])
    site.act(site.policy.tick(t(1)))
    assert all(site.vehicle(v).setpoint.power_kw < 0 for v in site.ids)
    site.act(site.policy.on_grid_signal(t(1.2), 50.25))
    assert all(site.vehicle(v).setpoint.power_kw >= 0 for v in site.ids)


@pytest.mark.parametrize(
    ("frequency_hz", "reason"),
    [(None, "grid frequency lost"), (47.2, "outside 47.5-51.5 Hz"), (51.6, "outside")],
)
def test_anti_islanding_puts_every_vehicle_in_the_safe_state(site, frequency_hz, reason):
    site.prices([400.0 - 10 * k for k in range(24)])
    site.act(site.policy.tick(t(1)))
    site.act(site.policy.on_grid_signal(t(2), frequency_hz))
    for vid in site.ids:
        state = site.vehicle(vid)
        assert state.setpoint is None and state.lease is None
        assert reason in state.safe_state_reason
    # nothing is granted again while islanded, and not before the reconnect delay
    assert site.policy.tick(t(3)).vehicle == []
    site.act(site.policy.on_grid_signal(t(4), 50.0))
    assert site.policy.state.islanded
    site.act(site.policy.on_grid_signal(t(9.5), 50.0))
    assert not site.policy.state.islanded
    grants = [c for c in site.policy.tick(t(10)).vehicle if isinstance(c, GrantControl)]
    assert len(grants) == 3


def test_emergency_stop_halts_all_discharge_until_cleared(site):
    site.prices([400.0 - 10 * k for k in range(24)])
    site.act(site.policy.tick(t(1)))
    decision = site.policy.emergency_stop(t(2), "fire alarm")
    assert all(isinstance(c, EnforceSafeState) for c in decision.vehicle)
    site.act(decision)
    assert all(site.vehicle(v).setpoint is None for v in site.ids)
    assert site.policy.tick(t(3)).vehicle == []
    site.act(site.policy.clear_emergency_stop(t(4), "all clear"))
    site.act(site.policy.tick(t(5)))
    assert all(site.vehicle(v).setpoint.power_kw < 0 for v in site.ids)


def test_watchdog_without_keep_alive_drives_power_to_zero(tmp_path):
    site = Site(tmp_path, watched=("coordinator",))
    site.sync()
    site.prices([400.0 - 10 * k for k in range(24)])
    site.policy.keep_alive("coordinator", t(1))
    site.act(site.policy.tick(t(1)))
    assert all(site.vehicle(v).setpoint.power_kw < 0 for v in site.ids)
    quiet = t(1) + timedelta(seconds=4.9)
    assert not any(isinstance(c, EnforceSafeState) for c in site.policy.tick(quiet).vehicle)
    site.act(site.policy.check_watchdog(t(1) + timedelta(seconds=5.1)))
    for vid in site.ids:
        state = site.vehicle(vid)
        assert state.setpoint is None and "watchdog" in state.safe_state_reason
    site.act(site.policy.keep_alive("coordinator", t(2)))
    assert site.policy.state.watchdog_tripped == ()
    site.close()


def test_a_charger_unreachable_for_more_than_2_s_gets_zero(site):
    site.prices([400.0 - 10 * k for k in range(24)])
    site.policy.see_charger("cp-0", t(1))
    site.act(site.policy.tick(t(1)))
    assert site.vehicle("ev-0").setpoint.power_kw < 0
    # silence between a station's messages is normal (they speak every 10-60 s)
    site.act(site.policy.tick(t(1) + timedelta(seconds=30)))
    assert site.vehicle("ev-0").setpoint.power_kw < 0
    # the gateway finds its connection dead: unreachable from then on
    lost = t(1) + timedelta(seconds=31)
    site.policy.charger_unreachable("cp-0", lost)
    site.act(site.policy.tick(lost + timedelta(seconds=1.5)))  # not yet 2 s
    assert site.vehicle("ev-0").setpoint.power_kw < 0
    site.act(site.policy.tick(lost + timedelta(seconds=2.5)))
    assert site.vehicle("ev-0").setpoint.power_kw == 0
    assert site.vehicle("ev-1").setpoint.power_kw < 0
    # it speaks again: reachable
    site.policy.see_charger("cp-0", lost + timedelta(seconds=10))
    site.act(site.policy.tick(lost + timedelta(seconds=11)))
    assert site.vehicle("ev-0").setpoint.power_kw < 0


def test_peak_shaving_discharges_to_hold_the_site_load(tmp_path):
    site = Site(tmp_path, peak_threshold_kw=100, demand_charge_eur_per_kw_month=8.0)
    site.sync()
    site.prices([0.0] * 24)  # at 0 EUR/MWh arbitrage alone would idle
    site.policy.site_load_kw = 112.0
    decision = site.policy.tick(t(1))
    site.act(decision)
    setpoints = {v: site.vehicle(v).setpoint for v in site.ids}
    total = sum(s.power_kw for s in setpoints.values() if s is not None)
    assert total == pytest.approx(-12.0, rel=1e-4)
    # the fullest battery first: ev-2 (80 %) gives its 11 kW, ev-1 (75 %) the rest
    assert setpoints["ev-2"].power_kw == pytest.approx(-11.0, rel=1e-4)
    assert setpoints["ev-0"] is None
    [peak] = [c for c in decision.dispatch if type(c).__name__ == "RecordPeakShaving"]
    assert peak.avoided_peak_kw == pytest.approx(12.0, rel=1e-4)
    site.close()


def test_a_trip_plan_triggers_a_replan_and_keeps_the_trip_energy(site):
    site.prices([400.0 - 10 * k for k in range(24)])
    site.act(site.policy.tick(t(1)))
    site.send(
        [
            PlanTrip(
                command_id="trip-0",
                issued_at=t(2),
                vehicle_id="ev-0",
                departure_at=t(120),
                energy_needed_kwh=77 * 0.7,
            )
        ]
    )
    site.sync()
    decision = site.policy.tick(t(3))
    assert any("trip plans changed" in r for r in decision.reasons)
    site.act(decision)
    setpoint = site.vehicle("ev-0").setpoint
    assert setpoint is None or setpoint.power_kw >= 0  # nothing above the trip to sell


def test_another_controllers_vehicle_is_left_alone(site):
    site.send(
        [
            GrantControl(
                command_id="other",
                issued_at=t(0.5),
                vehicle_id="ev-1",
                controller_id="dispatch-elsewhere",
                lease_until=t(60),
            )
        ]
    )
    site.sync()
    site.prices([400.0 - 10 * k for k in range(24)])
    decision = site.policy.tick(t(1))
    assert not any(c.vehicle_id == "ev-1" for c in decision.vehicle)
    refused = site.send(
        [
            RequestSetpoint(
                command_id="sneak",
                issued_at=t(2),
                vehicle_id="ev-0",
                controller_id="dispatch-elsewhere",
                power_kw=-5,
                valid_until=t(10),
            )
        ]
    )
    assert refused[0].event_types == ("VehicleSetpointRejected",)


# --------------------------------------------------------------------------- a lost record


def only(kind, commands):
    return [c for c in commands if isinstance(c, kind)]


def test_a_decision_whose_record_was_lost_is_recorded_as_orphaned_and_its_seq_not_reused(site):
    site.prices([400.0 - 10 * k for k in range(24)])
    site.act(site.policy.tick(t(1)))  # decision 1, recorded whole
    site.policy.set_target(-6.0)
    crashed = site.policy.tick(t(1.2))
    [lost] = only(IssueSetpoints, crashed.dispatch)
    assert lost.decision_seq == 2
    # the crash: the vehicles' appends of decision 2 made it to the log, its record did not
    site.send([c for c in crashed.dispatch if c is not lost] + crashed.vehicle)
    asked = {c.vehicle_id: c.power_kw for c in only(RequestSetpoint, crashed.vehicle)}
    assert asked and site.setpoints_in_log(2) == pytest.approx(asked)

    site.restart()
    assert site.policy.state.decision_seq == 1  # what the dispatcher's own stream says
    site.policy.set_target(-20.0)
    decision = site.policy.tick(t(1.4))
    orphan, issued = only((RecordOrphanedDecision, IssueSetpoints), decision.dispatch)
    assert isinstance(orphan, RecordOrphanedDecision) and orphan.decision_seq == 2
    assert orphan.vehicle_ids == tuple(sorted(asked))
    assert isinstance(issued, IssueSetpoints) and issued.decision_seq == 3
    results = site.act(decision)
    assert all(r.status == "recorded" and not r.duplicate for r in results)

    new_kw = {s.vehicle_id: s.power_kw for s in issued.setpoints}
    assert any(abs(new_kw[v] - asked[v]) > 1.0 for v in asked)  # it asks for something else
    assert site.setpoints_in_log(3) == pytest.approx(new_kw)
    for vid, power_kw in new_kw.items():
        setpoint = site.vehicle(vid).setpoint
        assert setpoint.power_kw == pytest.approx(power_kw)
        assert setpoint.valid_until == issued.valid_until
    # the dispatcher's stream explains the gap: 1, 2 (orphaned), 3
    rows = site.log.read_all(columns=["stream_id", "type", "payload"]).to_pylist()
    numbered = [
        (r["type"], json.loads(r["payload"])["decision_seq"])
        for r in rows
        if r["stream_id"] == "dispatch-depot-a" and "decision_seq" in r["payload"]
    ]
    assert numbered == [
        ("SetpointsIssued", 1),
        ("OrphanedDecisionRecorded", 2),
        ("SetpointsIssued", 3),
    ]


def test_numbers_lost_without_a_trace_below_an_orphan_are_recorded_too(site):
    site.prices([400.0 - 10 * k for k in range(24)])
    site.act(site.policy.tick(t(1)))
    site.policy.set_target(-6.0)
    site.policy.tick(t(1.2))  # decision 2: nothing of it reaches the log
    site.policy.set_target(-20.0)
    crashed = site.policy.tick(t(1.3))  # decision 3: only its vehicle commands do
    site.send(crashed.vehicle)
    site.restart()
    site.policy.set_target(-10.0)
    decision = site.policy.tick(t(1.4))
    orphans = only(RecordOrphanedDecision, decision.dispatch)
    assert [(o.decision_seq, bool(o.vehicle_ids)) for o in orphans] == [(2, False), (3, True)]
    [issued] = only(IssueSetpoints, decision.dispatch)
    assert issued.decision_seq == 4
    assert all(r.ok and not r.duplicate for r in site.act(decision))


def test_a_restart_never_reuses_the_numbers_of_decisions_still_in_flight(site):
    site.prices([400.0 - 10 * k for k in range(24)])
    site.act(site.policy.tick(t(1)))  # decision 1, recorded whole
    site.policy.set_target(-6.0)
    in_flight = site.policy.tick(t(1.2))  # decision 2: sent, nothing of it in the log yet
    site.restart()
    site.policy.reserve_in_flight(3)  # the dispatcher had three calls at a time
    # decision 2's commands reach the hosts only now, after the restart folded the log
    late = site.send(in_flight.vehicle_commands())
    assert all(r.status == "recorded" for r in late)
    site.policy.set_target(-20.0)
    decision = site.policy.tick(t(1.4))
    orphans = only(RecordOrphanedDecision, decision.dispatch)
    assert [o.decision_seq for o in orphans] == [2, 3, 4]
    assert all("in flight" in o.reason and not o.vehicle_ids for o in orphans)
    [issued] = only(IssueSetpoints, decision.dispatch)
    assert issued.decision_seq == 5
    # the new decision is applied, not answered as a repeat of the late one
    results = site.act(decision)
    assert all(r.status == "recorded" and not r.duplicate for r in results)
    for s in issued.setpoints:
        assert site.vehicle(s.vehicle_id).setpoint.power_kw == pytest.approx(s.power_kw)


def test_a_restart_after_nothing_was_lost_records_no_orphan(site):
    site.prices([400.0 - 10 * k for k in range(24)])
    decision = site.policy.tick(t(1))
    # the hosts append concurrently: the vehicles' events may precede the record's
    site.send(decision.vehicle)
    site.send(decision.dispatch)
    site.restart()
    site.policy.set_target(-6.0)
    after = site.policy.tick(t(1.2))
    assert only(RecordOrphanedDecision, after.dispatch) == []
    [issued] = only(IssueSetpoints, after.dispatch)
    assert issued.decision_seq == 2
    assert all(r.ok and not r.duplicate for r in site.act(after))
