"""What the server applies is what it publishes: a follower stays bit-identical to it."""

from __future__ import annotations

import pytest
import torch

from crowdtrain.compression.codecs import get_value_codec
from crowdtrain.compression.topk import TopKCompressor
from crowdtrain.node.client import CoordinatorClient
from crowdtrain.node.credentials import NodeLogin
from crowdtrain.protocol.update import UPDATE_FORMAT, UpdateMeta, encode_update

ROUNDS = 150

pytestmark = pytest.mark.slow

DOWNLINKS = {
    # (server settings, the follower pulls every N versions, the uplink's value codec)
    # published steps whole, in fp32: a chain longer than one version outweighs a snapshot
    "dense-fp32": ({}, 1, "fp16"),
    # top-5% of each step in fp16, the rest held back by the server's error feedback; the
    # follower pulls every third version, so chains of several versions are applied too
    "sparse-fp16": ({"downlink_density": 0.05, "downlink_value_codec": "fp16"}, 3, "fp16"),
    # a block codec both ways: int8 levels x per-block scales down, int4 up
    "sparse-int8": ({"downlink_density": 0.05, "downlink_value_codec": "int8"}, 4, "int4"),
}
# bytes per published entry (index, value, share of a 64-value block's fp32 scale)
ENTRY_BYTES = {"fp16": 4 + 2, "int8": 4 + 1 + 4 / 64}


@pytest.mark.parametrize("downlink", sorted(DOWNLINKS))
def test_replica_stays_bit_identical_after_many_rounds(e2e, downlink):
    settings, pull_every, uplink_codec = DOWNLINKS[downlink]
    e2e.start_server(evaluate="false", max_staleness=0, warmup_versions=5, **settings)
    # a node of its own: it submits the updates and follows what the server publishes
    login = NodeLogin(e2e.root / "follower-config", e2e.url, "follower", e2e.enrollment_token())
    client = CoordinatorClient(e2e.url, login)
    client.connect()
    manifest = client.manifest()
    version, lineage, replica = client.snapshot(manifest)
    initial = {name: t.clone() for name, t in replica.items()}
    compressor = TopKCompressor(0.05, get_value_codec(uplink_codec), seed=1)
    generator = torch.Generator().manual_seed(0)
    server_version, published_bytes = version, 0
    try:
        for i in range(ROUNDS):
            gradients = {
                p.name: torch.randn(p.shape, generator=generator) * 0.01 for p in manifest.params
            }
            meta = UpdateMeta(
                format=UPDATE_FORMAT,
                value_codec=uplink_codec,
                base_version=server_version,
                lineage=lineage,
                samples=4,
                tokens=512,
                loss=5.0,
                seq=login.next_seq(),
            )
            client.submit(encode_update(compressor.compress(gradients), meta))[0]
            server_version = client.wait_for_version(server_version, 30)["version"]
            if server_version % pull_every == 0 or i == ROUNDS - 1:
                chain = client.deltas(version, lineage, manifest)
                assert chain is not None, "the server asked for a snapshot"
                assert [v for v, _ in chain.versions] == list(
                    range(version + 1, server_version + 1)
                )
                published_bytes += sum(d.nbytes for _, ds in chain.versions for d in ds.values())
                version = chain.apply_to(replica)
        server_version, _, server_params = client.snapshot(manifest)
    finally:
        client.close()
    assert server_version == version == ROUNDS
    for name, tensor in server_params.items():
        assert torch.equal(replica[name], tensor), name
    # the weights really moved, so the check above compares two trained copies
    assert all(not torch.equal(initial[n], replica[n]) for n in replica)
    dense_bytes = ROUNDS * manifest.numel * 4
    codec = settings.get("downlink_value_codec")
    if codec is not None:  # 5% of the entries at ENTRY_BYTES each instead of 4 for all
        assert published_bytes < dense_bytes * 0.05 * ENTRY_BYTES[codec] / 4 * 1.05
    else:
        assert published_bytes == dense_bytes
