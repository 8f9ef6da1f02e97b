"""The Coordinator's round logic on a small parameter set, without HTTP."""

from __future__ import annotations

import time

import pytest
import torch

from crowdtrain.algorithms.aggregators import WeightedMean
from crowdtrain.algorithms.optimizers import OptimizerConfig, build_optimizer
from crowdtrain.algorithms.strategies import SyncStrategy
from crowdtrain.compression.codecs import get_value_codec
from crowdtrain.compression.sparse import SparseDelta
from crowdtrain.compression.topk import TopKCompressor
from crowdtrain.protocol.errors import WireError
from crowdtrain.protocol.update import UPDATE_FORMAT, DecodedUpdate, UpdateMeta
from crowdtrain.server.coordinator import Coordinator, RoundPolicy

SHAPES = {"w": (4, 3), "b": (5,)}


def make_coordinator(**policy) -> Coordinator:
    torch.manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(s)) for n, s in SHAPES.items()}
    optimizer = build_optimizer(params.values(), OptimizerConfig(lr=0.1))
    defaults = dict(min_nodes=2, deadline_s=30.0, max_staleness=1, warmup_versions=0)
    return Coordinator(
        params,
        optimizer,
        SyncStrategy(grad_clip=0.0),
        WeightedMean(SHAPES),
        RoundPolicy(**{**defaults, **policy}),
    )


def update(
    c: Coordinator,
    base: int | None = None,
    samples: int = 4,
    scale: float = 1.0,
    lineage: str | None = None,
) -> DecodedUpdate:
    meta = UpdateMeta(
        format=UPDATE_FORMAT,
        value_codec="fp32",
        base_version=c.version if base is None else base,
        lineage=lineage or c.lineage,
        samples=samples,
        tokens=samples * 8,
        loss=3.0,
    )
    deltas = {
        "w": SparseDelta(torch.tensor([0, 5], dtype=torch.int32), torch.tensor([scale, -scale])),
        "b": SparseDelta(None, torch.full((5,), scale)),
    }
    return DecodedUpdate(meta, deltas, wire_bytes=100, raw_bytes=200)


def wait_version(c: Coordinator, version: int) -> None:
    assert c.wait_for_version(version - 1, timeout=10) == version


def test_round_waits_for_quorum_of_distinct_nodes():
    c = make_coordinator()
    c.start()
    try:
        c.submit("a", update(c))
        c.submit("a", update(c))  # a second update from the same node is not a quorum
        assert c.wait_for_version(0, timeout=0.5) == 0
        c.submit("b", update(c))
        wait_version(c, 1)
    finally:
        c.stop()
    assert c.totals["updates"] == 3 and c.totals["samples"] == 12


def test_round_closes_on_deadline_without_quorum():
    c = make_coordinator(deadline_s=0.3)
    c.start()
    try:
        started = time.monotonic()
        c.submit("a", update(c))
        wait_version(c, 1)
        assert time.monotonic() - started >= 0.3
    finally:
        c.stop()


@pytest.mark.parametrize("downlink", [None, (0.2, "fp16"), (0.5, "bf16")])
def test_published_delta_is_exactly_what_was_applied(downlink):
    c = make_coordinator(min_nodes=1)
    if downlink is not None:
        c.downlink = TopKCompressor(downlink[0], get_value_codec(downlink[1]))
        c.downlink_codec = c.downlink.codec
    before = {n: p.detach().clone() for n, p in c.params.items()}
    replica = {n: t.clone() for n, t in before.items()}
    c.start()
    try:
        for expected in (1, 2, 3):
            c.submit("a", update(c, scale=0.37 * expected))
            wait_version(c, expected)
        chain = c.deltas_since(0, c.lineage)
    finally:
        c.stop()
    assert [v for v, _ in chain] == [1, 2, 3]
    for _, deltas in chain:
        if downlink is not None:  # sparse: top-k of each parameter, in the codec's dtype
            assert all(d.values.dtype == c.downlink_codec.wire_dtype for d in deltas.values())
            assert all(d.indices is not None for d in deltas.values())
        for name, delta in deltas.items():
            delta.add_to(replica[name])
    for name, p in c.params.items():
        assert torch.equal(replica[name], p.detach())
        assert not torch.equal(replica[name], before[name])


def test_lossy_downlink_holds_back_what_it_does_not_publish():
    # what the optimizer asked for == what was published + what the downlink still owes
    c = make_coordinator(min_nodes=1)
    c.downlink = TopKCompressor(0.25, get_value_codec("fp32"))
    c.downlink_codec = c.downlink.codec
    free = make_coordinator(min_nodes=1)  # the same run without a lossy downlink
    for coordinator in (c, free):
        coordinator.start()
        try:
            coordinator.submit("a", update(coordinator))
            wait_version(coordinator, 1)
        finally:
            coordinator.stop()
    for name, p in c.params.items():
        owed = c.downlink.residuals[name]
        assert owed.abs().sum() > 0
        assert torch.allclose(p.detach() + owed, free.params[name].detach(), atol=1e-6)


def test_stale_future_and_foreign_updates_are_refused_without_state_change():
    c = make_coordinator(min_nodes=1, max_staleness=1)
    c.start()
    try:
        for expected in (1, 2, 3):
            c.submit("a", update(c))
            wait_version(c, expected)
        snapshot = c.snapshot()
        with pytest.raises(WireError) as stale:
            c.submit("a", update(c, base=1))
        assert (stale.value.status, stale.value.code) == (409, "stale")
        assert stale.value.extra["current_version"] == 3
        with pytest.raises(WireError) as future:
            c.submit("a", update(c, base=4))
        assert future.value.code == "resync"
        with pytest.raises(WireError) as foreign:
            c.submit("a", update(c, lineage="another-run"))
        assert foreign.value.code == "resync"
        assert c.pending == 0
        version, params = c.snapshot()
        assert version == snapshot[0] == 3
        assert all(torch.equal(params[n], snapshot[1][n]) for n in params)
    finally:
        c.stop()


def test_full_queue_answers_busy_and_stop_drains_every_accepted_update():
    c = make_coordinator(min_nodes=3, max_pending=2)  # not started: nothing is consumed
    c.submit("a", update(c))
    c.submit("b", update(c))
    with pytest.raises(WireError) as busy:
        c.submit("c", update(c))
    assert busy.value.status == 503
    c.start()
    c.stop(drain=True)  # the two accepted updates close a (partial) round on the way out
    assert c.version == 1 and c.totals["updates"] == 2


def test_deltas_since_needs_snapshot_outside_window():
    c = make_coordinator(min_nodes=1, delta_window=2)
    c.start()
    try:
        for expected in range(1, 5):
            c.submit("a", update(c))
            wait_version(c, expected)
        assert c.deltas_since(4, c.lineage) == []
        assert [v for v, _ in c.deltas_since(2, c.lineage)] == [3, 4]
        assert c.deltas_since(1, c.lineage) is None  # version 2 fell out of the window
        assert c.deltas_since(5, c.lineage) is None  # ahead of the server
        assert c.deltas_since(4, "other") is None
    finally:
        c.stop()


def test_resent_update_is_answered_once_and_aggregated_once():
    c = make_coordinator(min_nodes=1)
    first = update(c)
    first = DecodedUpdate(
        first.meta.model_copy(update={"update_id": "abc123"}),
        first.deltas,
        first.wire_bytes,
        first.raw_bytes,
    )
    receipt = c.submit("a", first)
    again = c.submit("a", first)
    assert receipt["duplicate"] is False and again["duplicate"] is True
    assert c.pending == 1


def test_update_of_the_wrong_kind_is_refused():
    c = make_coordinator()
    wrong = update(c)
    wrong = DecodedUpdate(
        wrong.meta.model_copy(update={"kind": "pseudo_gradient"}),
        wrong.deltas,
        wrong.wire_bytes,
        wrong.raw_bytes,
    )
    with pytest.raises(WireError) as refused:
        c.submit("a", wrong)
    assert (refused.value.status, refused.value.code) == (422, "wrong_kind")
    assert c.pending == 0


class FailingStrategy(SyncStrategy):
    def _step(self, params, optimizer, combined) -> None:
        for p in params.values():
            p.data.add_(1.0)  # half a step, then a crash
        raise RuntimeError("boom")


def test_failed_step_keeps_the_last_version_and_refuses_further_updates():
    c = make_coordinator(min_nodes=1)
    c.strategy = FailingStrategy(grad_clip=0.0)
    before = c.snapshot()[1]
    c.start()
    c.submit("a", update(c))
    c.stop(drain=True)
    assert c.failure == "RuntimeError: boom"
    version, params = c.snapshot()
    assert version == 0
    assert all(torch.equal(params[n], before[n]) for n in params)
    with pytest.raises(WireError) as refused:
        c.submit("a", update(c))
    assert (refused.value.status, refused.value.code) == (503, "coordinator_failed")


def test_one_node_cannot_take_every_place_in_the_queue():
    c = make_coordinator(min_nodes=4, max_pending=8, max_pending_per_node=2)
    c.submit("fast", update(c))
    c.submit("fast", update(c))
    with pytest.raises(WireError) as busy:
        c.submit("fast", update(c))
    assert (busy.value.status, busy.value.code) == (503, "busy")
    c.submit("slow", update(c))  # another node still gets in
    assert c.pending == 3


def test_queue_never_holds_more_rounds_than_staleness_allows():
    c = make_coordinator(min_nodes=2, max_staleness=1, max_pending=64)
    assert c.queue_capacity == 2 * (1 + 1)


def test_refused_and_duplicate_updates_give_their_place_back():
    c = make_coordinator(min_nodes=4, max_pending=8, max_pending_per_node=1)
    with pytest.raises(WireError):
        c.submit("a", update(c, base=7))  # from the future: refused
    first = update(c)
    first = DecodedUpdate(
        first.meta.model_copy(update={"update_id": "x1"}),
        first.deltas,
        first.wire_bytes,
        first.raw_bytes,
    )
    c.submit("a", first)  # the refusal above did not keep a's only place
    c.reserve("b")
    c.release("b")
    assert c.submit("a", first)["duplicate"] is True  # a duplicate needs no place
    assert c.pending == 1
