"""The server's cap on update density: told in every receipt, enforced at intake, and each
node's density and link shown in the node list."""

from __future__ import annotations

import math

import torch

from crowdtrain.compression import SparseDelta, TopKCompressor, get_value_codec
from crowdtrain.protocol.update import UPDATE_FORMAT, UpdateMeta, encode_update

from .conftest import next_seq

MAX_DENSITY = 0.05
SERVER_SETTINGS = {"density_cap": MAX_DENSITY, "checkpoint_every": 1000}


def body(server, deltas: dict[str, SparseDelta], **meta) -> bytes:
    """An update body for the server's current version carrying `deltas` (fp16 values)."""
    version, lineage = server.version()
    fields = dict(
        format=UPDATE_FORMAT,
        value_codec="fp16",
        base_version=version,
        lineage=lineage,
        samples=8,
        tokens=1024,
        loss=5.0,
        index_codec="delta",
        seq=next_seq(),
        **meta,
    )
    # model_construct skips validation, so a test can also send metadata a node never would
    return encode_update(deltas, UpdateMeta.model_construct(**fields))


def update_at(server, density: float, **meta) -> bytes:
    """A real top-k update of every parameter at `density`, as a node builds it."""
    g = torch.Generator().manual_seed(0)
    gradients = {
        spec.name: torch.randn(spec.shape, generator=g) for spec in server.runtime.manifest.params
    }
    deltas = TopKCompressor(density, get_value_codec("fp16")).compress(gradients)
    return body(server, deltas, **meta)


def test_info_tells_nodes_the_cap(server):
    assert server.info()["training"]["density_cap"] == MAX_DENSITY


def test_an_update_at_the_cap_is_accepted_and_the_receipt_repeats_it(server):
    version, _ = server.version()
    body = update_at(server, MAX_DENSITY, upload_bytes_per_s=125_000.0, rtt_s=0.04)
    response = server.post_update(body, node="careful")
    assert response.status_code == 202, response.text
    assert response.json()["max_density"] in (MAX_DENSITY, MAX_DENSITY / 2)  # /2 when busy
    server.wait_past(version)
    node = server.node("careful")
    numel = server.runtime.manifest.numel
    expected_entries = sum(
        max(1, math.ceil(MAX_DENSITY * spec.numel)) for spec in server.runtime.manifest.params
    )
    assert node["density"] == expected_entries / numel
    assert node["upload_bytes_per_s"] == 125_000.0 and node["rtt_s"] == 0.04


def test_a_denser_update_is_refused_and_changes_nothing(server):
    version, _ = server.version()
    before = server.info()["totals"]
    response = server.post_update(update_at(server, 2 * MAX_DENSITY), node="greedy")
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "over_budget"
    assert str(MAX_DENSITY) in body["detail"] and "sparser" in body["detail"]
    assert body["max_density"] == MAX_DENSITY  # what the node obeys from its next update on
    assert server.version()[0] == version
    assert server.info()["totals"] == before
    assert server.node("greedy")["updates_refused"] == 1


def test_a_dense_update_is_refused_under_a_cap(server):
    deltas = {
        spec.name: SparseDelta(None, torch.zeros(spec.shape, dtype=torch.float16))
        for spec in server.runtime.manifest.params
    }
    response = server.post_update(body(server, deltas), node="dense")
    assert response.status_code == 422 and response.json()["error"] == "over_budget"


def test_link_figures_out_of_range_are_bad_metadata(server):
    body = update_at(server, MAX_DENSITY / 2, rtt_s=-1.0)
    response = server.post_update(body, node="liar")
    assert response.status_code == 422 and response.json()["error"] == "bad_metadata"
