"""Several Ray nodes on one machine: shards spread out, and a node lost mid-run costs nothing.

`ray.cluster_utils.Cluster` starts real raylets; removing a node kills the actors
on it, which come back on the remaining nodes, replay their streams from the log
and answer Ray's retried calls from the log's idempotency record.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster.client import FleetClient
from cluster.runtime import Runtime, RuntimeConfig
from tests.actors.counter import COUNTER, Add, OpenCounter
from tests.events.conftest import T0

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def three_nodes():
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"v2g-log": 1}, "include_dashboard": False},
    )
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, namespace="v2gfleet", log_to_driver=False)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_shards_spread_and_a_lost_node_loses_nothing(three_nodes, tmp_path):
    cluster, workers = three_nodes
    config = RuntimeConfig(
        name="multi", data_dir=str(tmp_path), shards={"counter": 4}, log_resources={"v2g-log": 1}
    )
    fleet = FleetClient(Runtime(config, deciders=[COUNTER]).start(), owns_ray=False)
    hosts = fleet.runtime.hosts("counter")
    nodes = ray.get([h.node_id.remote() for h in hosts])
    assert len(set(nodes)) >= 2, "shards of one kind must spread over the nodes"

    fleet.send_many(
        [OpenCounter(command_id=f"open-{i}", issued_at=T0, counter_id=f"c{i}") for i in range(8)]
    )
    batches = [
        [
            Add(command_id=f"b{b}-{i}", issued_at=T0, counter_id=f"c{i % 8}", amount=1)
            for i in range(40)
        ]
        for b in range(30)
    ]
    outcomes: list = []

    def sender() -> None:
        for batch in batches:
            outcomes.extend(fleet.send_many(batch))

    victim_node = next(w for w in workers if w.node_id in set(nodes))
    thread = threading.Thread(target=sender)
    thread.start()
    time.sleep(0.5)
    cluster.remove_node(victim_node)
    thread.join(timeout=180)
    assert not thread.is_alive()

    assert len(outcomes) == 1200 and all(r.status == "recorded" for r in outcomes)
    after = ray.get([h.node_id.remote() for h in hosts])
    assert victim_node.node_id not in after, "its shards must have moved to other nodes"
    recorded = Counter()
    for i in range(8):
        events = fleet.events(f"counter-c{i}")
        recorded.update(e.command_id for e in events if e.type == "Added")
        assert fleet.state("counter", f"c{i}").total == 150
    assert len(recorded) == 1200 and set(recorded.values()) == {1}
    fleet.close()
