"""Low-communication mode: two real nodes run DiLoCo rounds against a real server."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_diloco_nodes_train_with_one_update_per_inner_loop(e2e):
    inner_steps = 10
    e2e.start_server(
        algorithm="diloco", inner_steps=inner_steps, min_nodes=2, round_deadline_s=30, eval_every=5
    )
    e2e.start_nodes(2, "--duration", "40")
    for node in e2e.swarm.nodes:
        node.wait(timeout=180)
    assert [n.returncode for n in e2e.swarm.nodes] == [0, 0], e2e.logs()

    info = e2e.get("/info")
    assert info["training"]["algorithm"] == "diloco"
    assert info["training"]["update_kind"] == "pseudo_gradient"
    final = info["version"]
    assert final >= 5, e2e.logs()
    rounds = e2e.get("/history")["rounds"]
    # every update carries inner_steps local steps of 16 sequences, and the outer lr is constant
    assert all(r["samples"] == r["updates"] * inner_steps * 16 for r in rounds)
    assert {r["lr"] for r in rounds} == {0.7}
    # a round waits for both nodes, and no node computes on stale weights (no overlap)
    assert sum(r["nodes"] == 2 for r in rounds) >= len(rounds) - 2
    assert max(r["mean_staleness"] for r in rounds) <= 1

    first, last = e2e.first_and_final_evaluation(final)
    print("diloco validation loss", first["valid_loss"], "->", last["valid_loss"], "at", final)
    assert first["version"] == 0 and last["version"] == final
    assert last["valid_loss"] < first["valid_loss"] - 1.0, (first, last)
