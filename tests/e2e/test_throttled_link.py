"""The density controller on real links: a node behind a slow uplink sends sparser updates
within a few rounds, while a node on an unthrottled link keeps its density."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow

THROTTLED_RATE = 100_000  # bytes per second: a 25% update of tiny (~0.7 MB) takes ~7 s


def test_throttled_node_lowers_its_density_and_the_other_keeps_its_own(e2e):
    e2e.start_server(round_deadline_s=2, eval_every=1000)
    # both nodes run the same controller settings; only the link differs
    controller = {"upload_fraction": "1.0", "density_warmup": "4", "max_density": "0.25"}
    e2e.start_nodes(1, "--upload-limit", str(THROTTLED_RATE), density=None, **controller)
    e2e.start_nodes(1, density=None, **controller)
    throttled, free = "demo-node-0", "demo-node-1"

    seen: dict[str, list[tuple[int, float]]] = {throttled: [], free: []}

    def both_settled():
        for node in e2e.get("/info")["nodes"]:
            if node["node_id"] in seen and node["density"] is not None:
                points = seen[node["node_id"]]
                if not points or points[-1][0] != node["updates_accepted"]:
                    points.append((node["updates_accepted"], node["density"]))
        return len(seen[throttled]) >= 2 and seen[throttled][-1][1] < 0.02 and seen[free]

    e2e.wait_for(both_settled, 120, "the throttled node to lower its density")
    time.sleep(3)  # let the unthrottled node send a few more at its own density
    both_settled()
    print("densities by accepted updates", seen)
    first_low = next(n for n, density in seen[throttled] if density < 0.02)
    assert first_low <= 12, seen  # within a few rounds (at most halving per update)
    assert seen[free][-1][1] >= 0.2, seen  # the free node still sends at about max_density
    nodes = {n["node_id"]: n for n in e2e.get("/info")["nodes"]}
    # the links the nodes measured and reported, as the node list shows them
    assert nodes[throttled]["upload_bytes_per_s"] < 2 * THROTTLED_RATE, nodes
    assert nodes[free]["upload_bytes_per_s"] > 10 * THROTTLED_RATE, nodes
    assert nodes[throttled]["rtt_s"] is not None and nodes[throttled]["rtt_s"] < 1.0
