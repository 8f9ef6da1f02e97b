"""Unit tests for the wire formats: updates (strict decoding of untrusted bytes), snapshots,
delta chains and content encodings."""

import json
import math
import random
import struct

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_tensors

from crowdtrain.compression import SparseDelta, get_value_codec
from crowdtrain.protocol import Manifest, ParamSpec, WireError, encoding, safetensors_io
from crowdtrain.protocol.snapshot import (
    decode_deltas,
    decode_snapshot,
    encode_deltas,
    encode_snapshot,
)
from crowdtrain.protocol.update import (
    UPDATE_FORMAT,
    IntakeLimits,
    UpdateMeta,
    decode_update,
    encode_update,
    wire_tensors,
)

MANIFEST = Manifest([ParamSpec("w", (4, 5)), ParamSpec("b", (5,)), ParamSpec("emb.weight", (3, 2))])
LIMITS = IntakeLimits(max_body_bytes=1 << 20, max_raw_bytes=1 << 20)
WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BLOCK_CODECS = ["int8", "int4", "sign"]
FLT_MAX = torch.finfo(torch.float32).max


def meta_fields(**changes) -> dict[str, str]:
    fields = {
        "format": UPDATE_FORMAT,
        "value_codec": "fp16",
        "kind": "gradient",
        "base_version": "3",
        "lineage": "abc123",
        "samples": "16",
        "tokens": "2048",
        "loss": "4.5",
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def container(tensors: dict[str, torch.Tensor], **meta_changes) -> bytes:
    """An uncompressed update container, built directly (so it can break any rule)."""
    return save_tensors(tensors, metadata=meta_fields(**meta_changes))


def good_tensors(dtype=torch.float16) -> dict[str, torch.Tensor]:
    return {
        "w.idx": torch.tensor([0, 7, 19], dtype=torch.int32),
        "w.val": torch.tensor([1.0, -2.0, 0.5], dtype=dtype),
        "b.dense": torch.arange(5, dtype=dtype),
    }


def decode(body: bytes, content_encoding: str | None = "identity", limits=LIMITS):
    return decode_update(body, content_encoding, MANIFEST, limits)


def assert_wire_error(body: bytes, status: int, code: str, content_encoding="identity", **kw):
    with pytest.raises(WireError) as info:
        decode(body, content_encoding, **kw)
    assert (info.value.status, info.value.code) == (status, code), info.value.message
    assert info.value.to_json()["detail"] == info.value.message
    return info.value


# ---- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("content_encoding", ["zstd", "identity"])
@pytest.mark.parametrize("codec", ["fp16", "bf16", "fp32"])
def test_update_round_trip(codec, content_encoding):
    dtype = WIRE_DTYPES[codec]
    deltas = {
        "w": SparseDelta(
            torch.tensor([1, 2, 19], dtype=torch.int32), torch.tensor([0.5, -1, 3], dtype=dtype)
        ),
        "b": SparseDelta(None, torch.linspace(-1, 1, 5).to(dtype)),
        "emb.weight": SparseDelta(torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=dtype)),
    }
    meta = UpdateMeta(
        format=UPDATE_FORMAT,
        value_codec=codec,
        kind="pseudo_gradient",
        base_version=7,
        lineage="f00d",
        samples=32,
        tokens=4096,
        loss=3.25,
    )
    body = encode_update(deltas, meta, content_encoding)
    if content_encoding == "zstd":
        assert body[:4] == b"\x28\xb5\x2f\xfd"  # the zstd frame magic
    decoded = decode(body, content_encoding)
    assert decoded.meta == meta
    assert decoded.wire_bytes == len(body)
    assert decoded.nnz == 3 + 5 + 0
    assert set(decoded.deltas) == set(deltas)
    for name, delta in deltas.items():
        got = decoded.deltas[name]
        assert got.is_dense == delta.is_dense
        assert got.values.dtype == dtype and torch.equal(got.values, delta.values)
        if not delta.is_dense:
            assert got.indices.dtype == torch.int32 and torch.equal(got.indices, delta.indices)


def test_update_meta_to_wire_round_trips():
    fields = {**meta_fields(), "update_id": "0123abcd", "index_codec": "delta"}
    meta = UpdateMeta.model_validate(fields)
    assert meta.to_wire() == fields


def test_missing_content_encoding_means_identity():
    decoded = decode(container(good_tensors()), content_encoding=None)
    assert decoded.meta.base_version == 3
    assert decode(container(good_tensors()), content_encoding=" IDENTITY ").nnz == 8


def test_a_parameter_may_be_left_out():
    decoded = decode(container({"b.dense": torch.zeros(5, dtype=torch.float16)}))
    assert set(decoded.deltas) == {"b"}


# ---- size, compression and container errors -----------------------------------------------


def test_body_over_the_cap_is_413():
    limits = IntakeLimits(max_body_bytes=100, max_raw_bytes=1 << 20)
    assert_wire_error(b"\0" * 101, 413, "too_large", limits=limits)


def test_identity_body_over_the_raw_cap_is_413():
    raw = container(good_tensors())
    limits = IntakeLimits(max_body_bytes=1 << 20, max_raw_bytes=len(raw) - 1)
    assert_wire_error(raw, 413, "too_large", limits=limits)


def test_zstd_bomb_is_413():
    bomb = zstandard.ZstdCompressor(level=3).compress(b"\0" * (50 << 20))
    assert len(bomb) < LIMITS.max_body_bytes  # small on the wire, 50 MB once decompressed
    assert_wire_error(bomb, 413, "too_large", content_encoding="zstd")


def test_invalid_zstd_is_400():
    assert_wire_error(b"this is not zstd at all", 400, "bad_compression", content_encoding="zstd")


def test_truncated_zstd_is_rejected():
    body = encoding.compress(container(good_tensors()), "zstd")
    with pytest.raises(WireError) as info:
        decode(body[: len(body) // 2], "zstd")
    assert info.value.status == 400


@pytest.mark.parametrize("content_encoding", ["gzip", "deflate", "zstd, gzip"])
def test_unsupported_content_encoding_is_415(content_encoding):
    error = assert_wire_error(
        container(good_tensors()), 415, "unsupported_encoding", content_encoding=content_encoding
    )
    assert "zstd" in error.message


def test_truncated_container_is_400():
    raw = container(good_tensors())
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert_wire_error(raw[: 8 + header_len + 10], 400, "bad_container")  # cut in the data
    assert_wire_error(raw[: 8 + header_len // 2], 400, "bad_container")  # cut in the header
    assert_wire_error(raw[:5], 400, "bad_container")  # not even a length
    assert_wire_error(b"", 400, "bad_container")


def test_random_bytes_are_refused():
    body = random.Random(0).randbytes(4096)  # its first 8 bytes read as a huge header length
    assert_wire_error(body, 413, "header_too_large")
    body = struct.pack("<Q", 64) + random.Random(1).randbytes(64)
    assert_wire_error(body, 400, "bad_container")


def test_header_length_past_the_end_is_400():
    assert_wire_error(struct.pack("<Q", 100) + b"{}", 400, "bad_container")


def test_huge_header_length_is_413():
    assert_wire_error(struct.pack("<Q", 1 << 40) + b"{}", 413, "header_too_large")


@pytest.mark.parametrize("header", [b"not json", b"\xff\xfe\xfa", b"[1, 2]", b'"text"', b"null"])
def test_header_that_is_not_a_json_object_is_400(header):
    assert_wire_error(struct.pack("<Q", len(header)) + header, 400, "bad_container")


def test_deeply_nested_header_is_400():
    header = b"[" * 100_000
    assert_wire_error(struct.pack("<Q", len(header)) + header, 400, "bad_container")


@pytest.mark.parametrize(
    "metadata", [{"format": 1}, {"format": ["a"]}, {"format": None}, ["format"], "format"]
)
def test_metadata_not_string_to_string_is_400(metadata):
    header = json.dumps({"__metadata__": metadata}).encode()
    # ["format"] and "format" are truthy non-dicts; an empty or null one reads as no metadata
    assert_wire_error(struct.pack("<Q", len(header)) + header, 400, "bad_metadata")


# ---- metadata errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"base_version": "abc"}, "base_version"),
        ({"base_version": "-1"}, "base_version"),
        ({"samples": "0"}, "samples"),
        ({"samples": "many"}, "samples"),
        ({"tokens": "-5"}, "tokens"),
        ({"loss": "nan"}, "loss"),
        ({"loss": "inf"}, "loss"),
        ({"loss": "-1e400"}, "loss"),
        ({"format": "crowdtrain.update/999"}, "format"),
        ({"value_codec": "int3"}, "value_codec"),
        ({"kind": "weights"}, "kind"),
        ({"lineage": ""}, "lineage"),
        ({"lineage": "x" * 65}, "lineage"),
        ({"extra_key": "1"}, "extra_key"),
        ({"samples": None}, "samples"),
        ({"format": None}, "format"),
    ],
)
def test_bad_metadata_is_422(changes, field):
    error = assert_wire_error(container(good_tensors(), **changes), 422, "bad_metadata")
    assert field in error.message


def test_no_metadata_at_all_is_422():
    raw = save_tensors(good_tensors())
    assert_wire_error(raw, 422, "bad_metadata")


# ---- tensor layout errors ------------------------------------------------------------------


def test_empty_container_is_422():
    assert_wire_error(container({}), 422, "empty_update")


@pytest.mark.parametrize("tensor_name", ["nope.dense", "w.weight", "w.idx.val", "w", "w.scales"])
def test_unknown_tensor_name_is_422(tensor_name):
    tensors = {tensor_name: torch.zeros(20, dtype=torch.float16)}
    error = assert_wire_error(container(tensors), 422, "unknown_tensor")
    assert tensor_name in error.message


@pytest.mark.parametrize(
    "tensors",
    [
        {"w.idx": torch.tensor([0], dtype=torch.int32)},
        {"w.val": torch.tensor([0], dtype=torch.float16)},
        {
            "w.dense": torch.zeros(4, 5, dtype=torch.float16),
            "w.idx": torch.tensor([0], dtype=torch.int32),
        },
        {
            "w.dense": torch.zeros(4, 5, dtype=torch.float16),
            "w.idx": torch.tensor([0], dtype=torch.int32),
            "w.val": torch.tensor([0], dtype=torch.float16),
        },
    ],
    ids=["idx-without-val", "val-without-idx", "dense-and-idx", "dense-idx-and-val"],
)
def test_incomplete_or_mixed_layout_is_400(tensors):
    error = assert_wire_error(container(tensors), 400, "bad_layout")
    assert "'w'" in error.message


def sparse(indices, values, idx_dtype=torch.int32, val_dtype=torch.float16):
    return {
        "w.idx": torch.tensor(indices, dtype=idx_dtype),
        "w.val": torch.tensor(values, dtype=val_dtype),
    }


@pytest.mark.parametrize(
    "tensors, code",
    [
        (sparse([0, 1], [1, 2], idx_dtype=torch.int64), "bad_dtype"),
        (sparse([0, 1], [1, 2], idx_dtype=torch.float32), "bad_dtype"),
        (sparse([0, 1], [1, 2], val_dtype=torch.float32), "bad_dtype"),
        (sparse([0, 1], [1, 2], val_dtype=torch.bfloat16), "bad_dtype"),
        (sparse([0, 1, 2], [1, 2]), "bad_shape"),
        (sparse([0, 1], [1, 2, 3]), "bad_shape"),
        (sparse([[0, 1]], [[1, 2]]), "bad_shape"),
        (sparse(list(range(21)), [0.0] * 21), "bad_shape"),
        (sparse([-1, 3], [1, 2]), "index_out_of_range"),
        (sparse([3, 20], [1, 2]), "index_out_of_range"),
        (sparse([3, 2**31 - 1], [1, 2]), "index_out_of_range"),
        (sparse([5, 2, 9], [1, 2, 3]), "unsorted_indices"),
        (sparse([0, 30, 9], [1, 2, 3]), "unsorted_indices"),  # out of range in the middle
        (sparse([2, 2, 9], [1, 2, 3]), "unsorted_indices"),
        (sparse([0, 1, 2], [1, float("nan"), 3]), "not_finite"),
        (sparse([0, 1, 2], [1, float("inf"), 3]), "not_finite"),
        (sparse([0, 1, 2], [1, 2, float("-inf")]), "not_finite"),
        ({"b.dense": torch.zeros(6, dtype=torch.float16)}, "bad_shape"),
        ({"b.dense": torch.zeros(1, 5, dtype=torch.float16)}, "bad_shape"),
        ({"b.dense": torch.zeros(5, dtype=torch.float32)}, "bad_dtype"),
        ({"b.dense": torch.tensor([0, 0, float("nan"), 0, 0], dtype=torch.float16)}, "not_finite"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_tensor_is_422(tensors, code):
    assert_wire_error(container(tensors), 422, code)


def test_codec_in_metadata_decides_the_value_dtype():
    tensors = sparse([0, 1], [1, 2], val_dtype=torch.float32)
    assert decode(container(tensors, value_codec="fp32")).nnz == 2
    assert_wire_error(container(tensors, value_codec="bf16"), 422, "bad_dtype")


def test_one_bad_parameter_refuses_the_whole_update():
    tensors = good_tensors()
    tensors["emb.weight.dense"] = torch.full((3, 2), float("nan"), dtype=torch.float16)
    error = assert_wire_error(container(tensors), 422, "not_finite")
    assert "emb.weight" in error.message


# ---- block codecs (int8, int4, sign): NAME.scale next to NAME.val / NAME.dense --------------


def block_deltas(codec_name: str, seed: int = 0) -> dict[str, SparseDelta]:
    """An honest block-codec update: w sparse (3 of 20), b dense (5), emb.weight sparse, empty."""
    codec = get_value_codec(codec_name)
    g = torch.Generator().manual_seed(seed)
    return {
        "w": SparseDelta.encode(
            torch.randn(3, generator=g), codec, torch.tensor([0, 7, 19], dtype=torch.int32)
        ),
        "b": SparseDelta.encode(torch.randn(5, generator=g), codec),
        "emb.weight": SparseDelta.encode(torch.empty(0), codec, torch.empty(0, dtype=torch.int32)),
    }


def block_tensors(codec_name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return wire_tensors(block_deltas(codec_name, seed))


def assert_same_delta(got: SparseDelta, sent: SparseDelta) -> None:
    """Same wire tensors, same count, and bit-identical decoded values."""
    assert got.codec is sent.codec and got.count == sent.count and got.is_dense == sent.is_dense
    assert got.values.dtype == sent.values.dtype and torch.equal(got.values, sent.values)
    assert got.scales.dtype == torch.float32 and torch.equal(got.scales, sent.scales)
    if not sent.is_dense:
        assert got.indices.dtype == torch.int32 and torch.equal(got.indices, sent.indices)
    assert torch.equal(got.decoded().view(torch.int32), sent.decoded().view(torch.int32))


def meta_for(codec_name: str, **changes) -> UpdateMeta:
    return UpdateMeta.model_validate(meta_fields(value_codec=codec_name, **changes))


@pytest.mark.parametrize("index_codec", ["int32", "delta"])
@pytest.mark.parametrize("content_encoding", ["zstd", "identity"])
@pytest.mark.parametrize("codec", BLOCK_CODECS)
def test_block_codec_update_round_trip(codec, content_encoding, index_codec):
    deltas = block_deltas(codec)
    body = encode_update(deltas, meta_for(codec, index_codec=index_codec), content_encoding)
    raw = encoding.decompress(body, content_encoding, 1 << 20)
    header, _ = safetensors_io.read_header(raw)
    assert {"w.scale", "b.scale", "emb.weight.scale"} <= set(header)
    decoded = decode(body, content_encoding)
    assert decoded.meta.value_codec == codec
    assert decoded.nnz == 3 + 5 + 0
    assert set(decoded.deltas) == set(deltas)
    for name, delta in deltas.items():
        assert_same_delta(decoded.deltas[name], delta)
    assert decoded.deltas["b"].values.dim() == 1  # dense block-codec values travel 1-D


BIG = Manifest([ParamSpec("big", (7, 19)), ParamSpec("odd", (3,))])  # 133: 3 blocks; 3: odd


@pytest.mark.parametrize("codec", BLOCK_CODECS)
def test_block_codec_round_trip_over_several_blocks(codec):
    """Multi-block parameters, a partial last block, odd counts: decoded values are identical,
    and applying them to a copy of the weights gives the same bits on both sides."""
    value_codec = get_value_codec(codec)
    g = torch.Generator().manual_seed(1)
    weights = {"big": torch.randn(7, 19, generator=g), "odd": torch.randn(3, generator=g)}
    for layout in ("sparse", "dense"):
        if layout == "sparse":
            chosen = torch.randperm(133, generator=g)[:101].sort().values.to(torch.int32)
            big = SparseDelta.encode(torch.randn(101, generator=g), value_codec, chosen)
        else:
            big = SparseDelta.encode(torch.randn(7, 19, generator=g), value_codec)
        deltas = {"big": big, "odd": SparseDelta.encode(torch.randn(3, generator=g), value_codec)}
        assert big.scales.numel() == math.ceil(big.count / 64)
        body = encode_update(deltas, meta_for(codec))
        decoded = decode_update(body, "zstd", BIG, IntakeLimits.for_manifest(BIG))
        for name, delta in deltas.items():
            got = decoded.deltas[name]
            assert_same_delta(got, delta)
            mine, theirs = weights[name].clone(), weights[name].clone()
            delta.add_to(mine)
            got.add_to(theirs)
            assert torch.equal(mine.view(torch.int32), theirs.view(torch.int32))


def with_tensor(codec: str, name: str, tensor: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """An honest block-codec update with one wire tensor replaced (or removed: None)."""
    tensors = block_tensors(codec)
    if tensor is None:
        del tensors[name]
    else:
        tensors[name] = tensor
    return tensors


@pytest.mark.parametrize("param", ["w", "b"], ids=["sparse", "dense"])
@pytest.mark.parametrize("codec", BLOCK_CODECS)
@pytest.mark.parametrize(
    "scale, code",
    [
        (0.0, "bad_scale"),
        (-0.0, "bad_scale"),
        (-1.0, "bad_scale"),
        (-1e-30, "bad_scale"),
        # NaN and infinite scales are refused by the finiteness check, before the sign check
        (float("nan"), "not_finite"),
        (float("inf"), "not_finite"),
        (float("-inf"), "not_finite"),
    ],
    ids=["zero", "minus-zero", "negative", "tiny-negative", "nan", "inf", "minus-inf"],
)
def test_bad_scale_value_is_422(scale, code, codec, param):
    tensors = with_tensor(codec, f"{param}.scale", torch.tensor([scale]))
    error = assert_wire_error(container(tensors, value_codec=codec), 422, code)
    assert f"{param}.scale" in error.message


@pytest.mark.parametrize("param", ["w", "b"], ids=["sparse", "dense"])
@pytest.mark.parametrize("codec", BLOCK_CODECS)
@pytest.mark.parametrize(
    "scale, code",
    [
        (torch.ones(2), "bad_shape"),  # one block, two scales
        (torch.ones(0), "bad_shape"),
        (torch.tensor(1.0), "bad_shape"),  # 0-d
        (torch.ones(1, 1), "bad_shape"),
        (torch.ones(1, dtype=torch.float16), "bad_dtype"),
        (torch.ones(1, dtype=torch.bfloat16), "bad_dtype"),
        (torch.ones(1, dtype=torch.float64), "bad_dtype"),
        (torch.ones(1, dtype=torch.int32), "bad_dtype"),
    ],
    ids=["two", "none", "0-d", "2-d", "fp16", "bf16", "fp64", "int32"],
)
def test_scale_of_wrong_shape_or_dtype_is_422(scale, code, codec, param):
    tensors = with_tensor(codec, f"{param}.scale", scale)
    assert_wire_error(container(tensors, value_codec=codec), 422, code)


def test_scale_count_follows_the_blocks():
    codec = get_value_codec("int4")
    limits = IntakeLimits.for_manifest(BIG)
    delta = SparseDelta.encode(
        torch.randn(7, 19, generator=torch.Generator().manual_seed(0)), codec
    )
    tensors = wire_tensors({"big": delta})
    assert tensors["big.scale"].shape == (3,) and tensors["big.dense"].shape == (67,)
    for scales in (tensors["big.scale"][:2], torch.cat([tensors["big.scale"], torch.ones(1)])):
        body = container({**tensors, "big.scale": scales}, value_codec="int4")
        with pytest.raises(WireError) as info:
            decode_update(body, "identity", BIG, limits)
        assert (info.value.status, info.value.code) == (422, "bad_shape")


@pytest.mark.parametrize("param", ["w", "b", "emb.weight"], ids=["sparse", "dense", "empty"])
@pytest.mark.parametrize("codec", BLOCK_CODECS)
def test_missing_scale_for_a_block_codec_is_400(codec, param):
    tensors = with_tensor(codec, f"{param}.scale", None)
    error = assert_wire_error(container(tensors, value_codec=codec), 400, "bad_layout")
    assert ".scale" in error.message and codec in error.message


@pytest.mark.parametrize("codec", ["fp16", "bf16", "fp32"])
def test_scale_sent_with_a_float_codec_is_400(codec):
    for param in ("w", "b"):
        tensors = good_tensors(WIRE_DTYPES[codec])
        tensors[f"{param}.scale"] = torch.ones(1)
        error = assert_wire_error(container(tensors, value_codec=codec), 400, "bad_layout")
        assert f"'{param}'" in error.message


@pytest.mark.parametrize("codec", BLOCK_CODECS)
def test_scale_alone_is_400(codec):
    tensors = block_tensors(codec)
    del tensors["w.idx"], tensors["w.val"]  # w.scale stays, for no values
    error = assert_wire_error(container(tensors, value_codec=codec), 400, "bad_layout")
    assert "'w'" in error.message


@pytest.mark.parametrize("param", ["w.val", "b.dense"], ids=["sparse", "dense"])
@pytest.mark.parametrize(
    "codec, dtype",
    [
        ("int8", torch.uint8),
        ("int8", torch.float16),
        ("int4", torch.int8),
        ("int4", torch.float32),
        ("sign", torch.int8),
        ("sign", torch.bool),
    ],
)
def test_block_codec_values_of_the_wrong_dtype_are_422(codec, dtype, param):
    right = block_tensors(codec)[param]
    tensors = with_tensor(codec, param, right.to(dtype))
    error = assert_wire_error(container(tensors, value_codec=codec), 422, "bad_dtype")
    assert param in error.message


@pytest.mark.parametrize(
    "codec, param, length",
    [
        ("int4", "w.val", 3),  # 3 values pack into 2 bytes: one byte too many
        ("int4", "w.val", 1),
        ("int4", "w.val", 0),
        ("int4", "b.dense", 4),  # 5 values: 3 bytes
        ("int4", "b.dense", 5),  # one byte per value is not the packing
        ("sign", "w.val", 2),  # up to 8 values: 1 byte
        ("sign", "w.val", 0),
        ("sign", "b.dense", 5),
        ("int8", "w.val", 4),
        ("int8", "b.dense", 4),
    ],
)
def test_packed_values_of_the_wrong_length_are_422(codec, param, length):
    dtype = get_value_codec(codec).wire_dtype
    tensors = with_tensor(codec, param, torch.zeros(length, dtype=dtype))
    error = assert_wire_error(container(tensors, value_codec=codec), 422, "bad_shape")
    assert param in error.message


@pytest.mark.parametrize("codec", BLOCK_CODECS)
def test_dense_block_codec_values_in_the_parameter_shape_are_422(codec):
    """Block codecs send dense values 1-D, packed; the parameter's 2-D shape is refused."""
    value_codec = get_value_codec(codec)
    dense = SparseDelta.encode(torch.randn(4, 5), value_codec)
    assert dense.values.shape == value_codec.wire_shape(20)
    tensors = {"w.dense": dense.values, "w.scale": dense.scales}
    assert decode(container(tensors, value_codec=codec)).deltas["w"].count == 20
    shaped = {"w.dense": torch.zeros(4, 5, dtype=value_codec.wire_dtype), "w.scale": dense.scales}
    assert_wire_error(container(shaped, value_codec=codec), 422, "bad_shape")
    flat = {"w.dense": dense.values.reshape(1, -1), "w.scale": dense.scales}
    assert_wire_error(container(flat, value_codec=codec), 422, "bad_shape")


def test_block_codec_in_metadata_decides_the_layout():
    """The same tensors read as int8 are refused as int4 (and the other way round)."""
    tensors = block_tensors("int8")
    assert decode(container(tensors, value_codec="int8")).nnz == 8
    assert_wire_error(container(tensors, value_codec="int4"), 422, "bad_dtype")
    assert_wire_error(container(tensors, value_codec="fp16"), 400, "bad_layout")


@pytest.mark.parametrize(
    "codec, level, scale",
    [
        ("int8", torch.tensor([127], dtype=torch.int8), 3e38),
        ("int8", torch.tensor([-128], dtype=torch.int8), FLT_MAX / 127),  # level no node sends
        ("int4", torch.tensor([0x00], dtype=torch.uint8), FLT_MAX / 7),  # nibble 0: level -8
    ],
    ids=["int8-huge-scale", "int8-level-minus-128", "int4-level-minus-8"],
)
def test_scale_that_overflows_at_decode_is_refused(codec, level, scale):
    """Every check passes (finite positive scale, honest layout), yet level x scale is inf in
    fp32: the update would put inf into the server's sums and every replica's weights."""
    tensors = {
        "w.idx": torch.tensor([4], dtype=torch.int32),
        "w.val": level,
        "w.scale": torch.tensor([scale]),
    }
    try:
        decoded = decode(container(tensors, value_codec=codec))
    except WireError as exc:
        assert exc.status == 422 and exc.code in ("bad_scale", "not_finite"), exc.message
        return
    pytest.fail(f"accepted; decodes to {decoded.deltas['w'].decoded().tolist()}")


# ---- fuzzing: nothing but WireError ---------------------------------------------------------

VALID_BODY = encode_update(
    {
        "w": SparseDelta(torch.tensor([0, 7, 19], dtype=torch.int32), torch.ones(3).half()),
        "b": SparseDelta(None, torch.ones(5).half()),
    },
    UpdateMeta.model_validate(meta_fields()),
    "identity",
)
VALID_ZSTD = encoding.compress(VALID_BODY, "zstd")


VALID_BLOCK_BODIES = [
    encode_update(block_deltas(codec, seed=2), meta_for(codec), "identity")
    for codec in BLOCK_CODECS
]


def _only_wire_errors(body: bytes, content_encoding: str) -> None:
    """Decoding raises WireError with a 4xx status, or gives deltas that decode cleanly (the
    checks leave nothing that makes the codec's extract fail)."""
    try:
        decoded = decode(body, content_encoding)
    except WireError as exc:
        assert 400 <= exc.status < 500
        return
    for delta in decoded.deltas.values():
        assert delta.decoded().shape == (delta.count,)


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The block-codec fuzzers below build containers tensor by tensor (slower per example).
BLOCK_FUZZ = settings(FUZZ, max_examples=150)


@FUZZ
@given(body=st.binary(max_size=2048), content_encoding=st.sampled_from(["identity", "zstd"]))
def test_random_bytes_raise_only_wire_errors(body, content_encoding):
    _only_wire_errors(body, content_encoding)


@FUZZ
@given(
    cut=st.integers(min_value=0, max_value=len(VALID_BODY)),
    flips=st.lists(st.tuples(st.integers(0, len(VALID_BODY) - 1), st.integers(1, 255)), max_size=4),
)
def test_truncated_or_flipped_bodies_raise_only_wire_errors(cut, flips):
    body = bytearray(VALID_BODY)
    for position, mask in flips:
        body[position] ^= mask
    _only_wire_errors(bytes(body[:cut]), "identity")


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(VALID_ZSTD)))
def test_truncated_zstd_bodies_raise_only_wire_errors(cut):
    _only_wire_errors(VALID_ZSTD[:cut], "zstd")


@BLOCK_FUZZ
@given(data=st.data())
def test_truncated_or_flipped_block_codec_bodies_raise_only_wire_errors(data):
    valid = data.draw(st.sampled_from(VALID_BLOCK_BODIES))
    cut = data.draw(st.integers(min_value=0, max_value=len(valid)))
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(1, 255)), max_size=4)
    )
    body = bytearray(valid)
    for position, mask in flips:
        body[position] ^= mask
    _only_wire_errors(bytes(body[:cut]), "identity")


# scales an honest node never sends next to ones it does (MIN_SCALE, ordinary, huge)
SCALE_VALUES = st.one_of(
    st.sampled_from(
        [0.0, -0.0, -1.0, float("nan"), float("-nan"), float("inf"), float("-inf"), 1e-45]
        + [torch.finfo(torch.float32).tiny, 3e38]
    ),
    st.floats(min_value=2.0**-100, max_value=2.0**100, width=32),
    st.floats(width=32),
)


@st.composite
def _any_bits(draw, dtype: torch.dtype, count: int) -> torch.Tensor:
    """`count` entries of `dtype`, any bit pattern (packed levels, NaN halves, ...)."""
    size = count * torch.empty(0, dtype=dtype).element_size()
    raw = draw(st.binary(min_size=size, max_size=size))
    if not raw:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).clone()


@st.composite
def block_codec_containers(draw) -> bytes:
    """A block-codec container near an honest one: each parameter sparse, dense or absent;
    each of its tensors mostly of the honest layout (sorted indices, the packed length, the
    codec's dtype, one fp32 scale per block) but with any bits in the values and any scales;
    now and then one thing off (a length, a dtype, an unsorted index, a scale left out, an
    fp16 update carrying scales); then maybe truncated."""
    codec_name = draw(st.sampled_from(BLOCK_CODECS * 3 + ["fp16"]))
    codec = get_value_codec(codec_name)

    def honest() -> bool:  # 90%; the rare draws are mid-range (hypothesis favours 0 and 19)
        return draw(st.integers(0, 19)) not in (5, 13)

    def off_by() -> int:
        return 0 if honest() else draw(st.sampled_from([-1, 1]))

    tensors: dict[str, torch.Tensor] = {}
    for spec in MANIFEST.params:
        layout = draw(st.sampled_from(["sparse", "sparse", "dense", "dense", "absent"]))
        if layout == "absent":
            continue
        if layout == "sparse":
            if honest():
                indices = sorted(draw(st.sets(st.integers(0, spec.numel - 1))))
            else:
                indices = draw(st.lists(st.integers(-2, spec.numel + 1), max_size=spec.numel))
            tensors[f"{spec.name}.idx"] = torch.tensor(indices, dtype=torch.int32)
            count, shape, suffix = len(indices), codec.wire_shape(len(indices)), "val"
        else:
            count, shape, suffix = spec.numel, codec.wire_shape(spec.numel, spec.shape), "dense"
        dtype = codec.wire_dtype if honest() else draw(st.sampled_from([torch.int8, torch.uint8]))
        length = max(0, math.prod(shape) + off_by())
        values = draw(_any_bits(dtype, length))
        if length == math.prod(shape):
            values = values.reshape(shape)
        tensors[f"{spec.name}.{suffix}"] = values
        if codec.has_scales == honest():  # a scale with block codecs, now and then with fp16
            blocks = max(0, math.ceil(count / 64) + off_by())
            scales = torch.tensor(
                draw(st.lists(SCALE_VALUES, min_size=blocks, max_size=blocks)), dtype=torch.float32
            )
            tensors[f"{spec.name}.scale"] = scales if honest() else scales.half()
    index_codec = "int32" if honest() else "delta"
    body = container(tensors, value_codec=codec_name, index_codec=index_codec)
    if draw(st.integers(0, 9)) == 5:  # cut, mostly near the end (in the data)
        body = body[: len(body) - draw(st.integers(1, len(body)))]
    return body


@BLOCK_FUZZ
@given(body=block_codec_containers(), content_encoding=st.sampled_from(["identity", "zstd"]))
def test_block_codec_containers_raise_only_wire_errors(body, content_encoding):
    if content_encoding == "zstd":
        body = encoding.compress(body, "zstd")
    _only_wire_errors(body, content_encoding)


# ---- snapshots and delta chains --------------------------------------------------------------


def model_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p.name: torch.randn(p.shape, generator=g) for p in MANIFEST.params}


def test_snapshot_fp32_round_trip_is_exact():
    params = model_params()
    raw = encode_snapshot(params, version=12, lineage="cafe")
    decoded, meta = decode_snapshot(raw, MANIFEST)
    assert meta == {"version": 12, "lineage": "cafe"}
    assert set(decoded) == set(params)
    for name, p in params.items():
        assert decoded[name].dtype == torch.float32 and torch.equal(decoded[name], p)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_snapshot_half_precision(dtype):
    params = model_params()
    raw = encode_snapshot(params, version=1, lineage="cafe", dtype=dtype)
    stored = safetensors_io.load(raw)
    decoded, _ = decode_snapshot(raw, MANIFEST)
    for name, p in params.items():
        assert stored[name].dtype == WIRE_DTYPES[dtype]
        assert torch.equal(stored[name], p.to(WIRE_DTYPES[dtype]))
        assert torch.equal(decoded[name], p.to(WIRE_DTYPES[dtype]).float())
    assert len(raw) < len(encode_snapshot(params, version=1, lineage="cafe"))


def test_snapshot_checked_against_the_manifest():
    params = model_params()
    with pytest.raises(WireError, match="do not match") as info:
        decode_snapshot(encode_snapshot({"w": params["w"]}, 1, "x"), MANIFEST)
    assert info.value.code == "bad_snapshot"
    params["b"] = torch.zeros(6)
    with pytest.raises(WireError, match="wrong shape"):
        decode_snapshot(encode_snapshot(params, 1, "x"), MANIFEST)
    with pytest.raises(WireError, match="not a snapshot"):
        decode_snapshot(encode_deltas([], "x", "fp32"), MANIFEST)


def test_delta_chain_round_trip_reconstructs_the_weights():
    start = model_params(0)
    dense = {name: SparseDelta(None, torch.randn(p.shape) * 1e-3) for name, p in start.items()}
    sparse = {
        "w": SparseDelta(torch.tensor([0, 7, 19], dtype=torch.int32), torch.randn(3) * 1e-3),
        "b": SparseDelta(torch.tensor([4], dtype=torch.int32), torch.randn(1) * 1e-3),
    }
    chain = [(5, dense), (6, sparse)]
    decoded, lineage, codec = decode_deltas(encode_deltas(chain, "beef", "fp32"), MANIFEST)
    assert lineage == "beef" and codec.name == "fp32"
    assert [v for v, _ in decoded] == [5, 6]
    assert set(decoded[1][1]) == {"w", "b"}  # a parameter a version leaves out is unchanged
    expected = {name: p.clone() for name, p in start.items()}
    got = {name: p.clone() for name, p in start.items()}
    for (_, sent), (_, received) in zip(chain, decoded, strict=True):
        for name in sent:
            sent[name].add_to(expected[name])
            received[name].add_to(got[name])
    for name in MANIFEST.by_name:
        assert torch.equal(got[name], expected[name])
        assert not torch.equal(got[name], start[name])


def test_empty_delta_chain_round_trips():
    chain, lineage, codec = decode_deltas(encode_deltas([], "beef", "fp16"), MANIFEST)
    assert (chain, lineage, codec.name) == ([], "beef", "fp16")


def test_delta_chain_checked_against_the_manifest():
    bad = {"w": SparseDelta(None, torch.zeros(3))}  # wrong shape for w
    with pytest.raises(WireError, match="shape"):
        decode_deltas(encode_deltas([(2, bad)], "x", "fp32"), MANIFEST)
    unsorted = {"w": SparseDelta(torch.tensor([5, 1], dtype=torch.int32), torch.ones(2))}
    with pytest.raises(WireError) as info:
        decode_deltas(encode_deltas([(2, unsorted)], "x", "fp32"), MANIFEST)
    assert info.value.code == "unsorted_indices"
    with pytest.raises(WireError, match="not a delta chain"):
        decode_deltas(encode_snapshot(model_params(), 1, "x"), MANIFEST)


@pytest.mark.parametrize("versions", [None, "not json", "5"])
def test_delta_chain_with_bad_versions_metadata_is_a_wire_error(versions):
    meta = {"format": "crowdtrain.deltas/2", "lineage": "x", "value_codec": "fp32"}
    if versions is not None:
        meta["versions"] = versions
    with pytest.raises(WireError):
        decode_deltas(save_tensors({}, metadata=meta), MANIFEST)


def test_manifest_json_round_trip():
    assert Manifest.from_json(MANIFEST.to_json()) == MANIFEST
    assert MANIFEST.numel == 20 + 5 + 6
    assert MANIFEST.dense_nbytes() == 31 * 4


# ---- content encodings ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, accepted",
    [
        ("zstd", True),
        ("gzip, deflate, br, zstd", True),
        ("ZSTD", True),
        (" gzip ,zstd ", True),
        ("zstd;q=0.5", True),
        ("zstd;q=1", True),
        ("zstd;q=0", False),
        ("zstd; q=0", False),
        ("gzip, deflate", False),
        ("zstdx", False),
        ("", False),
        (None, False),
    ],
)
def test_accepts(header, accepted):
    assert encoding.accepts(header, "zstd") is accepted


@pytest.mark.parametrize("header", ["zstd;q=0.0", "zstd;q=0.000", "zstd;Q=0"])
def test_accepts_zero_quality_in_any_spelling(header):
    assert not encoding.accepts(header, "zstd")


def test_compress_round_trip_and_unknown_encoding():
    data = b"abc" * 1000
    assert encoding.decompress(encoding.compress(data, "zstd"), "zstd", len(data)) == data
    assert encoding.compress(data, "identity") is data
    with pytest.raises(ValueError, match="gzip"):
        encoding.compress(data, "gzip")


def test_decompress_cap_is_inclusive():
    data = b"x" * 5000
    body = encoding.compress(data, "zstd")
    assert encoding.decompress(body, "zstd", 5000) == data
    with pytest.raises(WireError) as info:
        encoding.decompress(body, "zstd", 4999)
    assert info.value.status == 413


def test_multiple_zstd_frames_are_read():
    body = encoding.compress(b"a" * 10, "zstd") + encoding.compress(b"b" * 10, "zstd")
    assert encoding.decompress(body, "zstd", 100) == b"a" * 10 + b"b" * 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finiteness_check_catches_every_non_finite_value_in_every_wire_dtype(dtype, bad):
    from crowdtrain.protocol.update import _all_finite

    assert not _all_finite(torch.tensor([1.0, bad, -3.0]).to(dtype))
    assert _all_finite(torch.tensor([1.0, -65504.0, 3e-8, 0.0]).to(dtype))
    assert _all_finite(torch.empty(0, dtype=dtype))


# ---- brotli and negotiation -------------------------------------------------------------


def test_brotli_round_trip_and_bounded_decompression():
    import brotli

    data = b"crowdtrain " * 5000
    assert encoding.decompress(encoding.compress(data, "br"), "br", 1 << 20) == data
    bomb = brotli.compress(b"\0" * (50 << 20))  # ~100 bytes that inflate to 50 MB
    with pytest.raises(WireError) as too_large:
        encoding.decompress(bomb, "br", 1 << 20)
    assert (too_large.value.status, too_large.value.code) == (413, "too_large")
    for bad in (encoding.compress(data, "br")[:-4], b"not brotli at all" * 3):
        with pytest.raises(WireError) as invalid:
            encoding.decompress(bad, "br", 1 << 20)
        assert (invalid.value.status, invalid.value.code) == (400, "bad_compression")


@pytest.mark.parametrize(
    "header, chosen",
    [
        ("zstd, br", "zstd"),
        ("br", "br"),
        ("gzip, br;q=0.5", "br"),
        ("zstd;q=0, br", "br"),
        ("gzip, deflate", "identity"),
        (None, "identity"),
    ],
)
def test_server_answers_with_the_best_encoding_the_client_accepts(header, chosen):
    assert encoding.choose(header) == chosen


def test_update_decodes_from_brotli_too():
    body = encoding.compress(container(good_tensors()), "br")
    decoded = decode(body, content_encoding="br")
    assert set(decoded.deltas) == {"w", "b"}
    assert decoded.wire_bytes == len(body)


# ---- delta-coded indices ------------------------------------------------------------------


def test_delta_coded_indices_round_trip_and_are_smaller():
    indices = torch.arange(0, 20, 3, dtype=torch.int32)  # 0, 3, ..., 18
    deltas = {"w": SparseDelta(indices, torch.ones(indices.numel(), dtype=torch.float16))}
    wire = wire_tensors(deltas, index_codec="delta")
    assert wire["w.idx"].tolist() == [0, 3, 3, 3, 3, 3, 3]
    body = container(wire, index_codec="delta")
    decoded = decode(body)
    assert torch.equal(decoded.deltas["w"].indices, indices)


@pytest.mark.parametrize(
    "gaps, code",
    [
        ([2, -1, 4], "unsorted_indices"),  # a negative gap goes backwards
        ([2, 0, 4], "unsorted_indices"),  # a zero gap repeats a position
        ([5, 10, 10], "index_out_of_range"),  # adds up past the parameter (20 entries)
        ([-1, 3], "index_out_of_range"),  # starts before position 0
        ([2**31 - 1, 2**31 - 1], "index_out_of_range"),  # past int32
    ],
)
def test_bad_delta_coded_indices_are_refused(gaps, code):
    tensors = {
        "w.idx": torch.tensor(gaps, dtype=torch.int32),
        "w.val": torch.ones(len(gaps), dtype=torch.float16),
    }
    assert_wire_error(container(tensors, index_codec="delta"), 422, code)


def test_unknown_index_codec_is_bad_metadata():
    assert_wire_error(container(good_tensors(), index_codec="varint"), 422, "bad_metadata")
