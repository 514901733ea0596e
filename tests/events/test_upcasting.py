"""Changing an event is a migration: old versions in the log are lifted when read."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from actors.vehicle import VEHICLE
from events.base import UnknownEventType, load_event, upcast
from events.log import EventLog
from events.schema import PendingBatchBuilder
from events.vehicle import VehicleTelemetryReported

AT = datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
V1_PAYLOAD = json.dumps(
    {
        "vehicle_id": "van-1",
        "at": AT.isoformat(),
        "measured_at": AT.isoformat(),
        "soc": 0.64,
        "battery_temp_c": 21.5,
        "soh": 0.97,
    }
)


def test_a_version_1_telemetry_event_reads_as_version_2_with_unrecorded_source():
    event = load_event("VehicleTelemetryReported", 1, V1_PAYLOAD)
    assert isinstance(event, VehicleTelemetryReported)
    assert (event.soc, event.source) == (0.64, "unrecorded")


def test_the_log_keeps_the_old_bytes_and_readers_get_the_new_shape(tmp_path):
    with EventLog(str(tmp_path / "log")) as log:
        builder = PendingBatchBuilder()
        builder.add(
            "vehicle-van-1", 1, "old/0", "VehicleTelemetryReported", 1, AT, "old", "", V1_PAYLOAD
        )
        log.append_batch(builder.build())
        [recorded] = log.read_stream("vehicle-van-1")

    assert recorded.schema_version == 1 and recorded.payload == V1_PAYLOAD  # never rewritten
    state = VEHICLE.evolve(VEHICLE.initial_state("van-1"), recorded.event())
    assert state.reading is not None and state.reading.soc == 0.64


def test_a_version_newer_than_the_code_is_refused_rather_than_misread():
    with pytest.raises(UnknownEventType, match="newer than this code"):
        upcast("VehicleTelemetryReported", 3, json.loads(V1_PAYLOAD))
