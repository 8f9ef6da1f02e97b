"""What the server applies is what it publishes: a follower stays bit-identical to it."""

from __future__ import annotations

import pytest
import torch

from crowdtrain.compression.codecs import get_value_codec
from crowdtrain.compression.topk import TopKCompressor
from crowdtrain.node.client import CoordinatorClient, apply_deltas
from crowdtrain.protocol.update import UPDATE_FORMAT, UpdateMeta, encode_update

ROUNDS = 150

pytestmark = pytest.mark.slow


def test_replica_stays_bit_identical_after_many_rounds(e2e):
    e2e.start_server(evaluate="false", max_staleness=0, warmup_versions=5)
    client = CoordinatorClient(e2e.url, "follower")
    manifest = client.manifest()
    version, lineage, replica = client.snapshot(manifest)
    initial = {name: t.clone() for name, t in replica.items()}
    compressor = TopKCompressor(0.05, get_value_codec("fp16"), seed=1)
    generator = torch.Generator().manual_seed(0)
    try:
        for _ in range(ROUNDS):
            gradients = {
                p.name: torch.randn(p.shape, generator=generator) * 0.01 for p in manifest.params
            }
            meta = UpdateMeta(
                format=UPDATE_FORMAT,
                value_codec="fp16",
                base_version=version,
                lineage=lineage,
                samples=4,
                tokens=512,
                loss=5.0,
            )
            client.submit(encode_update(compressor.compress(gradients), meta))
            chain = client.deltas(version, lineage, manifest, wait=30)
            assert chain and chain[0][0] == version + 1
            version = apply_deltas(replica, chain)
        server_version, _, server_params = client.snapshot(manifest)
    finally:
        client.close()
    assert server_version == version == ROUNDS
    for name, tensor in server_params.items():
        assert torch.equal(replica[name], tensor), name
    # the weights really moved, so the check above compares two trained copies
    assert all(not torch.equal(initial[n], replica[n]) for n in replica)
