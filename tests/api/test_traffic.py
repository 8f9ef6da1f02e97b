"""Traffic accounting: bytes per node and per kind, as sent and as decompressed."""

from __future__ import annotations

import zstandard


def test_bytes_are_counted_per_node_and_kind_on_the_wire_and_raw(server):
    before = server.info()["traffic"]
    body = server.update_body()
    raw = zstandard.ZstdDecompressor().decompress(body)
    version, _ = server.version()
    assert server.post_update(body, node="counted").status_code == 202
    server.wait_past(version)
    snapshot = server.get(
        "/model/snapshot", headers={**server.as_node("counted"), "Accept-Encoding": "identity"}
    )
    assert snapshot.status_code == 200
    deltas = server.get(
        "/model/deltas",
        params={"since": version, "lineage": server.version()[1]},
        headers={**server.as_node("counted"), "Accept-Encoding": "zstd"},
    )
    assert deltas.status_code == 200

    record = server.node("counted")["traffic"]
    assert record["update"] == {"wire": len(body), "raw": len(raw)}
    assert record["snapshot"] == {"wire": len(snapshot.content), "raw": len(snapshot.content)}
    assert deltas.headers["content-encoding"] == "zstd"
    assert record["deltas"]["wire"] == len(deltas.content)  # zstd on the wire ...
    raw_deltas = zstandard.ZstdDecompressor().decompress(deltas.content)
    assert record["deltas"]["raw"] == len(raw_deltas)  # ... and the container it holds
    assert record["deltas"]["wire"] < record["deltas"]["raw"]
    node = server.node("counted")
    assert node["bytes_in"] == len(body)
    assert node["bytes_out"] == len(snapshot.content) + len(deltas.content)

    after = server.info()["traffic"]
    for kind in ("update", "snapshot", "deltas"):
        for key in ("wire", "raw"):
            assert after[kind][key] - before[kind][key] == record[kind][key]
