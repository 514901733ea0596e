"""A traced command: the host continues the sender's trace and hands it on in the event."""

from __future__ import annotations

import json

import pytest

from actors.host import EntityHost
from actors.tracing import continued, traceparent_in, traceparent_of
from events.log import EventLog
from tests.actors.counter import COUNTER, Add, OpenCounter
from tests.events.conftest import T0


def test_the_decide_span_is_a_child_of_the_sender_and_its_context_is_in_the_event(
    telemetry, tmp_path
):
    with EventLog(str(tmp_path / "log")) as log:
        host = EntityHost(COUNTER, log)
        host.handle([OpenCounter(command_id="c1", issued_at=T0, counter_id="a")])
        with continued("", "gateway.receive") as gateway_span:
            sent = traceparent_of(gateway_span)
        host.handle(
            [Add(command_id="c2", issued_at=T0, counter_id="a", amount=2, traceparent=sent)]
        )
        [opened, added] = log.read_stream("counter-a")

    spans = {s.name: s for s in telemetry.spans.get_finished_spans()}
    decide, append = spans["counter.decide"], spans["log.append"]
    assert decide.parent.span_id == gateway_span.get_span_context().span_id
    assert decide.context.trace_id == gateway_span.get_span_context().trace_id
    assert [link.context.span_id for link in append.links] == [decide.context.span_id]
    _, trace_id, span_id, _ = traceparent_in(added.metadata).split("-")
    assert (int(trace_id, 16), int(span_id, 16)) == (
        decide.context.trace_id,
        decide.context.span_id,
    )
    assert json.loads(opened.metadata) == {}  # untraced commands carry nothing


def test_a_malformed_traceparent_is_refused_at_the_command():
    with pytest.raises(ValueError, match="traceparent"):
        Add(command_id="c", issued_at=T0, counter_id="a", amount=1, traceparent="nope")


def test_a_traced_command_decides_exactly_like_an_untraced_one(telemetry, tmp_path):
    from actors.vehicle import VEHICLE, RegisterVehicle

    def register(command_id: str, traceparent: str = "") -> RegisterVehicle:
        return RegisterVehicle(
            command_id=command_id,
            issued_at=T0,
            vehicle_id=command_id,
            model="Kia Niro",
            site_id="depot",
            traceparent=traceparent,
        )

    with continued("", "gateway.receive") as span:
        sent = traceparent_of(span)
    with EventLog(str(tmp_path / "log")) as log:
        host = EntityHost(VEHICLE, log)
        plain, traced = host.handle([register("van-1"), register("van-2", sent)])
    assert plain.status == traced.status == "recorded"
    assert host.state("van-2").spec == host.state("van-1").spec
