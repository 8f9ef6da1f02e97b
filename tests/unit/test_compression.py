"""Unit tests for value codecs, top-k selection and the error-feedback TopKCompressor."""

import gc
import math

import pytest
import torch

from crowdtrain.compression import (
    VALUE_CODECS,
    SparseDelta,
    TopKCompressor,
    get_value_codec,
    select_topk,
)
from crowdtrain.compression import codecs as codecs_module
from crowdtrain.compression.codecs import MIN_SCALE, BlockCodec, FloatCodec, ValueCodec
from crowdtrain.compression.topk import EXACT_TOPK_MAX_NUMEL

# Round-to-nearest bounds: relative error at most the unit roundoff (2^-p for p significand
# bits) in the normal range; below it the absolute error is half the smallest subnormal step.
FP16_REL, FP16_SMALLEST_NORMAL, FP16_ABS = 2.0**-11, 2.0**-14, 2.0**-25
BF16_REL = 2.0**-8
FP32_UNIT_ROUNDOFF = 2.0**-24

FLOAT_CODECS = ["bf16", "fp16", "fp32"]
BLOCK_CODECS = ["int4", "int8", "sign"]
# Largest level an honest encoder sends: the scale is the block's absmax over it.
MAX_LEVEL = {"int8": 127.0, "int4": 7.0}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _values(seed: int = 0, n: int = 4096) -> torch.Tensor:
    """fp32 values across many magnitudes (tiny, ordinary, large) and both signs."""
    g = _generator(seed)
    scales = torch.tensor([1e-7, 1e-4, 1e-2, 1.0, 1e2, 1e4])
    return torch.randn(n, generator=g) * scales[torch.randint(len(scales), (n,), generator=g)]


def _dense_sent(delta: SparseDelta, shape) -> torch.Tensor:
    """What the receiver reconstructs: fp32 values scattered into a zero tensor of `shape`."""
    return delta.to_dense(shape)


def _round_trip(codec, values: torch.Tensor) -> torch.Tensor:
    wire, scales = codec.compress(values)
    return codec.extract(wire, scales, values.numel())


# ---- value codecs -----------------------------------------------------------------------


def test_registry_names_match_codec_names():
    assert set(VALUE_CODECS) == {"fp32", "fp16", "bf16", "int8", "int4", "sign"}
    for name, codec in VALUE_CODECS.items():
        assert codec.name == name
        assert get_value_codec(name) is codec


def test_unknown_codec_names_the_choices():
    with pytest.raises(
        ValueError, match=r"unknown value codec 'int3'.*bf16, fp16, fp32, int4, int8, sign$"
    ):
        get_value_codec("int3")


@pytest.mark.parametrize(
    "name, ratio",
    [
        ("fp32", 1.0),
        ("fp16", 2.0),
        ("bf16", 2.0),
        # 32 bits per fp32 value over (bits per value + one fp32 scale shared by 64 values)
        ("int8", 32 / 8.5),
        ("int4", 32 / 4.5),
        ("sign", 32 / 1.5),
    ],
)
def test_compression_ratio_and_wire_dtype(name, ratio):
    codec = get_value_codec(name)
    assert codec.estimate_compression_ratio() == pytest.approx(ratio, rel=1e-12)
    values = _values()  # 4096 values: 64 full blocks, a whole number of bytes for every codec
    wire, scales = codec.compress(values)
    assert wire.dtype == codec.wire_dtype
    assert (scales is not None) == codec.has_scales
    assert codec.extract(wire, scales, values.numel()).dtype == torch.float32
    # The estimate is what the wire really takes for whole blocks.
    sent = SparseDelta(None, wire, scales, codec, values.numel())
    assert values.numel() * 4 / sent.nbytes == pytest.approx(ratio, rel=1e-12)


def test_fp32_round_trip_is_exact():
    codec = get_value_codec("fp32")
    values = _values()
    wire, scales = codec.compress(values)
    assert scales is None
    assert torch.equal(codec.extract(wire, None, values.numel()), values)


def test_fp16_round_trip_within_half_precision():
    codec = get_value_codec("fp16")
    values = _values()
    back = _round_trip(codec, values)
    error = (back - values).abs()
    normal = values.abs() >= FP16_SMALLEST_NORMAL
    assert normal.any() and (~normal).any()  # both regimes are exercised
    assert bool((error[normal] <= FP16_REL * values.abs()[normal]).all())
    assert bool((error[~normal] <= FP16_ABS).all())


def test_fp16_clamps_instead_of_overflowing():
    codec = get_value_codec("fp16")
    wire, scales = codec.compress(torch.tensor([1e6, -1e6, 65504.0, 7.0]))
    assert scales is None
    assert torch.equal(wire, torch.tensor([65504.0, -65504.0, 65504.0, 7.0], dtype=torch.float16))


def test_bf16_round_trip_within_bfloat_precision():
    codec = get_value_codec("bf16")
    values = torch.cat([_values(), torch.tensor([1e30, -1e-30, 3e38])])
    back = _round_trip(codec, values)
    assert bool(((back - values).abs() <= BF16_REL * values.abs()).all())


@pytest.mark.parametrize("name", sorted(VALUE_CODECS))
def test_empty_tensor_round_trips(name):
    codec = get_value_codec(name)
    wire, scales = codec.compress(torch.empty(0))
    assert wire.dtype == codec.wire_dtype and wire.numel() == 0
    assert tuple(wire.shape) == codec.wire_shape(0)
    if codec.has_scales:
        assert scales.dtype == torch.float32 and tuple(scales.shape) == (0,)
        assert codec.scales_shape(0) == (0,)
    else:
        assert scales is None and codec.scales_shape(0) is None
    assert codec.extract(wire, scales, 0).shape == (0,)


@pytest.mark.parametrize("name", FLOAT_CODECS)
def test_bf16_input_round_trips(name):
    """bf16 values (ordinary magnitudes) survive every float codec exactly: each wire dtype
    holds them. (Block codecs quantize; their bounds are tested below.)"""
    codec = get_value_codec(name)
    values = (torch.randn(1000, generator=_generator(1)) * 10).to(torch.bfloat16)
    back = _round_trip(codec, values)
    assert back.dtype == torch.float32
    assert torch.equal(back, values.float())


def test_fp16_clamps_large_bf16_input():
    codec = get_value_codec("fp16")
    wire, _ = codec.compress(torch.tensor([1e5, -1e5], dtype=torch.bfloat16))
    assert bool(torch.isfinite(wire).all())
    assert torch.equal(wire, torch.tensor([65504.0, -65504.0], dtype=torch.float16))


# ---- select_topk --------------------------------------------------------------------------


@pytest.mark.parametrize("numel, k", [(1, 1), (10, 3), (1000, 1), (1000, 10), (4097, 400)])
def test_select_topk_matches_torch_topk(numel, k):
    magnitudes = torch.randn(numel, generator=_generator(numel)).abs()
    chosen = select_topk(magnitudes, k)
    assert chosen.dtype == torch.int64
    assert torch.equal(chosen, chosen.sort().values)
    assert set(chosen.tolist()) == set(torch.topk(magnitudes, k).indices.tolist())


def test_select_topk_edge_sizes():
    magnitudes = torch.rand(5)
    assert select_topk(magnitudes, 0).numel() == 0
    assert select_topk(torch.empty(0), 3).numel() == 0
    assert torch.equal(select_topk(magnitudes, 5), torch.arange(5))
    assert torch.equal(select_topk(magnitudes, 50), torch.arange(5))


def test_select_topk_sampled_threshold_on_a_large_tensor():
    numel = 3_000_000
    assert numel > EXACT_TOPK_MAX_NUMEL  # the sampled path, not the exact one
    k = numel // 100
    magnitudes = torch.randn(numel, generator=_generator(2)).abs()
    chosen = select_topk(magnitudes, k, generator=_generator(3))
    assert abs(chosen.numel() - k) <= 0.2 * k
    assert bool((chosen[1:] > chosen[:-1]).all())  # sorted and unique
    assert int(chosen[0]) >= 0 and int(chosen[-1]) < numel
    # A threshold cut: every chosen entry is larger than every entry left out.
    left_out = torch.ones(numel, dtype=torch.bool)
    left_out[chosen] = False
    assert magnitudes[chosen].min() > magnitudes[left_out].max()


def test_select_topk_large_tensor_of_ties_falls_back_to_exact():
    numel = EXACT_TOPK_MAX_NUMEL + 1000
    chosen = select_topk(torch.ones(numel), 100, generator=_generator(0))
    assert chosen.numel() == 100
    assert bool((chosen[1:] > chosen[:-1]).all())


# ---- TopKCompressor ----------------------------------------------------------------------


def test_density_must_be_in_unit_interval():
    for density in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="density"):
            TopKCompressor(density, get_value_codec("fp16"))


# Codecs whose error feedback is exact bit for bit; see the docstring below for why, and why
# the sign codec is not among them.
EXACT_FEEDBACK = {"fp32", "fp16", "bf16", "int8", "int4"}


def _invariant_params():
    for density in (0.01, 0.1, 1.0):
        for name in sorted(VALUE_CODECS):
            yield pytest.param(name, density, id=f"{density}-{name}")


@pytest.mark.parametrize("codec_name, density", list(_invariant_params()))
def test_error_feedback_invariant_is_exact(codec_name, density):
    """sent + new residual == input + old residual, bit for bit, over several steps.

    Exact (torch.equal), not approximate: at a sent entry the residual is `a - q(a)`. For float
    codecs q(a) is `a` rounded to the wire dtype and so within a factor of two of `a`; for int8
    and int4 q(a) = level x scale with |a - q(a)| <= scale/2, so q(a) is either 0 or again
    within a factor of two of `a`. By Sterbenz's lemma that subtraction is exact in fp32, and so
    is `q(a) + (a - q(a)) == a`. Entries not sent keep `a` itself. The inputs stay below fp16's
    clamp, where the lemma would not hold.

    The sign codec sends q(a) = +-(mean magnitude of the block), which may be far from `a` (or of
    the other sign), so `a - q(a)` is rounded once: there the residual is still exactly the one
    fp32 subtraction `a - q(a)`, and sent + residual is `a` within half an fp32 ulp of `a - q(a)`.
    """
    codec = get_value_codec(codec_name)
    compressor = TopKCompressor(density, codec, seed=1)
    g = _generator(7)
    shapes = {"w": (32, 48), "b": (48,), "odd": (3, 67), "empty": (0,)}
    for step in range(4):
        inputs = {
            name: torch.randn(shape, generator=g) * 10.0**step for name, shape in shapes.items()
        }
        old = {
            name: compressor.residuals.get(name, torch.zeros(shape)).clone()
            for name, shape in shapes.items()
        }
        sent = compressor.compress(inputs)
        for name, shape in shapes.items():
            delta = sent[name]
            expected = inputs[name] + old[name]
            dense_sent = _dense_sent(delta, shape)
            residual = compressor.residuals[name]
            # Every codec: the residual is exactly one fp32 subtraction.
            assert torch.equal(residual, expected - dense_sent), (codec_name, density, step, name)
            if codec_name in EXACT_FEEDBACK:
                assert torch.equal(dense_sent + residual, expected), (codec_name, density, step)
            else:
                # In fp64 the sum of the two fp32 tensors is exact (up to 2^-53 relative, the
                # slack factor), so this measures the one rounding of `a - q(a)`.
                a, q, r = expected.double(), dense_sent.double(), residual.double()
                bound = (a - q).abs() * FP32_UNIT_ROUNDOFF * (1 + 2.0**-20)
                assert bool(((q + r - a).abs() <= bound).all()), (codec_name, density, step)
            assert delta.values.dtype == codec.wire_dtype
            numel = expected.numel()
            if codec.has_scales:
                assert delta.scales.dtype == torch.float32
                assert tuple(delta.scales.shape) == codec.scales_shape(delta.count)
                assert bool((delta.scales > 0).all())
            else:
                assert delta.scales is None
            if density == 1.0:
                assert delta.is_dense and delta.count == numel
                assert tuple(delta.values.shape) == codec.wire_shape(numel, shape)
            elif numel:
                assert delta.indices.dtype == torch.int32
                assert delta.nnz == math.ceil(density * numel)
                assert tuple(delta.values.shape) == codec.wire_shape(delta.nnz)
                assert bool((delta.indices[1:] > delta.indices[:-1]).all())


def test_sign_error_feedback_is_not_bit_exact():
    """Why the invariant above is checked to a bound for the sign codec: q(1e-7) is the block's
    mean magnitude, ~0.5, and 1e-7 - 0.5 rounds in fp32."""
    compressor = TopKCompressor(1.0, get_value_codec("sign"))
    x = torch.tensor([1.0, 1e-7])
    sent = compressor.compress({"x": x})["x"].to_dense((2,))
    residual = compressor.residuals["x"]
    assert torch.equal(residual, x - sent)
    assert not torch.equal(sent + residual, x)
    assert float((sent + residual - x).abs().max()) <= 0.5 * FP32_UNIT_ROUNDOFF


def test_dense_fp32_sends_the_values_themselves():
    compressor = TopKCompressor(1.0, get_value_codec("fp32"))
    x = torch.tensor([1.0, -2.0, 3.0])
    sent = compressor.compress({"x": x})["x"]
    assert sent.values.tolist() == [1.0, -2.0, 3.0]
    assert compressor.residuals["x"].tolist() == [0.0, 0.0, 0.0]


def test_compressor_sends_the_largest_entries():
    compressor = TopKCompressor(0.25, get_value_codec("fp32"))
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 0.05, 1.0])
    sent = compressor.compress({"x": x})["x"]
    assert sent.indices.tolist() == [1, 3]
    assert sent.values.tolist() == [-5.0, 3.0]
    expected_residual = x.clone()
    expected_residual[[1, 3]] = 0.0
    assert torch.equal(compressor.residuals["x"], expected_residual)
    # The next step adds the residual: what was left out gets its turn.
    sent = compressor.compress({"x": torch.zeros(8)})["x"]
    assert sent.indices.tolist() == [4, 7]


def test_fp16_clamped_excess_stays_in_the_residual():
    codec = get_value_codec("fp16")
    compressor = TopKCompressor(1.0, codec)
    x = torch.tensor([1e5, -2.0])
    sent = compressor.compress({"x": x})["x"]
    assert sent.values.tolist() == [65504.0, -2.0]
    assert compressor.residuals["x"].tolist() == [1e5 - 65504.0, 0.0]


def test_compress_does_not_modify_its_input():
    compressor = TopKCompressor(0.1, get_value_codec("fp16"))
    x = torch.randn(100, generator=_generator(0))
    before = x.clone()
    compressor.compress({"x": x})
    compressor.compress({"x": x})
    assert torch.equal(x, before)


def _second_update(density: float, codec_name: str):
    """(compressor, its residual before, the input, what it sent) for a second update of "w",
    so that the residual it starts from is not zero."""
    compressor = TopKCompressor(density, get_value_codec(codec_name), seed=3)
    g = _generator(11)
    compressor.compress({"w": torch.randn(20, 30, generator=g)})
    old = compressor.residuals["w"].clone()
    x = torch.randn(20, 30, generator=g)
    return compressor, old, x, compressor.compress({"w": x})


@pytest.mark.parametrize("density", [0.05, 1.0])
@pytest.mark.parametrize("codec_name", ["fp16", "bf16", "int8", "int4"])
def test_restore_puts_a_refused_update_back(density, codec_name):
    compressor, old, x, sent = _second_update(density, codec_name)
    assert not torch.equal(compressor.residuals["w"], x + old)
    compressor.restore(sent)
    # Exact for the same reason as the invariant: (a - q(a)) + q(a) == a in fp32.
    assert torch.equal(compressor.residuals["w"], x + old)


@pytest.mark.parametrize("density", [0.05, 1.0])
def test_restore_puts_a_refused_sign_update_back(density):
    """The sign codec's residual `a - q(a)` is rounded once (see the invariant above), so the
    restored residual is `a` within half an fp32 ulp of `a - q(a)`, plus the one rounding of
    adding q(a) back."""
    compressor, old, x, sent = _second_update(density, "sign")
    q = sent["w"].to_dense((20, 30)).double()
    compressor.restore(sent)
    a, restored = (x + old).double(), compressor.residuals["w"].double()
    bound = ((a - q).abs() + a.abs()) * FP32_UNIT_ROUNDOFF * (1 + 2.0**-20)
    assert bool(((restored - a).abs() <= bound).all())


def test_compress_accepts_a_non_contiguous_tensor():
    compressor = TopKCompressor(0.5, get_value_codec("fp32"))
    x = torch.arange(12.0).reshape(3, 4).t()
    sent = compressor.compress({"x": x})["x"]
    assert torch.equal(sent.to_dense(x.shape) + compressor.residuals["x"], x)


def test_sparse_delta_to_dense():
    delta = SparseDelta(torch.tensor([0, 5], dtype=torch.int32), torch.tensor([1.5, -2.0]))
    dense = delta.to_dense((2, 3))
    assert torch.equal(dense, torch.tensor([[1.5, 0, 0], [0, 0, -2.0]]))
    assert not delta.is_dense and delta.nnz == 2
    values = torch.ones(2, 3, dtype=torch.float16)
    dense_delta = SparseDelta(None, values)
    out = dense_delta.to_dense((2, 3))
    assert (
        dense_delta.is_dense and out.dtype == torch.float32 and torch.equal(out, torch.ones(2, 3))
    )


# ---- block codecs (int8, int4, sign) ---------------------------------------------------------

# Counts around the block size (64) and the packing unit (2 values per int4 byte, 8 per sign
# byte): odd, one short of and one past a block, several blocks with a partial last one.
COUNTS = [1, 2, 3, 7, 9, 63, 64, 65, 127, 129, 200, 1000]


def _blocks(values: torch.Tensor) -> list[torch.Tensor]:
    return list(values.reshape(-1).split(64))


def _per_value(scales: torch.Tensor, count: int) -> torch.Tensor:
    return scales.repeat_interleave(64)[:count]


@pytest.mark.parametrize("name", BLOCK_CODECS)
@pytest.mark.parametrize("count", COUNTS)
def test_block_codec_wire_shapes(name, count):
    codec = get_value_codec(name)
    assert codec.has_scales and codec.block_size == 64
    values = _values(count, count)
    wire, scales = codec.compress(values.reshape(1, -1))  # the parameter's shape does not matter
    bits = {"int8": 8, "int4": 4, "sign": 1}[name]
    assert tuple(wire.shape) == codec.wire_shape(count) == (math.ceil(count * bits / 8),)
    assert codec.wire_shape(count, (1, count)) == codec.wire_shape(count)  # dense goes 1-D
    assert tuple(scales.shape) == codec.scales_shape(count) == (math.ceil(count / 64),)
    assert wire.dtype == codec.wire_dtype and scales.dtype == torch.float32
    assert bool((scales > 0).all())
    assert codec.extract(wire, scales, count).shape == (count,)


@pytest.mark.parametrize("name", FLOAT_CODECS)
def test_float_codec_wire_shapes_keep_the_parameter_shape(name):
    codec = get_value_codec(name)
    assert not codec.has_scales and codec.scales_shape(20) is None
    assert codec.wire_shape(20) == (20,)
    assert codec.wire_shape(20, (4, 5)) == (4, 5)


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("count", COUNTS)
def test_int_codec_error_is_at_most_half_a_scale_per_block(name, count):
    """Per block: scale = absmax / 127 (int8) or / 7 (int4), levels within +-that, and every
    decoded value within scale/2 of the input (round to nearest level)."""
    codec, top = get_value_codec(name), MAX_LEVEL[name]
    for seed in range(3):
        values = _values(seed * 1000 + count, count)  # magnitudes 1e-7..1e4 mixed in a block
        wire, scales = codec.compress(values)
        back = codec.extract(wire, scales, count)
        expected_scales = torch.stack([b.abs().max() / top for b in _blocks(values)])
        assert torch.equal(scales, expected_scales.clamp_min(MIN_SCALE))
        per_value = _per_value(scales, count)
        assert bool(((values - back).abs() <= per_value / 2).all())
        levels = _wire_levels(name, wire, count)
        assert bool((levels.abs() <= top).all())
        assert torch.equal(back, levels * per_value)  # one multiplication per value


def _wire_levels(name: str, wire: torch.Tensor, count: int) -> torch.Tensor:
    """The integer levels on the wire, read independently of the codec's own unpacking."""
    if name == "int8":
        return wire[:count].float()
    nibbles = [(byte >> shift) & 0x0F for byte in wire.tolist() for shift in (0, 4)]
    return torch.tensor(nibbles[:count], dtype=torch.float32) - 8


def test_int8_hand_computed():
    codec = get_value_codec("int8")
    wire, scales = codec.compress(torch.tensor([254.0, -100.0, 6.0, 0.0, -254.0]))
    assert scales.tolist() == [2.0]  # absmax 254 / 127
    assert wire.tolist() == [127, -50, 3, 0, -127]
    assert codec.extract(wire, scales, 5).tolist() == [254.0, -100.0, 6.0, 0.0, -254.0]


def test_int4_packing_hand_computed():
    """Two values per byte, low nibble first, nibble = level + 8; an odd count pads with 8."""
    codec = get_value_codec("int4")
    wire, scales = codec.compress(torch.tensor([7.0, -7.0, 0.0, 3.0, -1.0]))
    assert scales.tolist() == [1.0]  # absmax 7 / 7
    # levels 7, -7, 0, 3, -1 -> nibbles 15, 1, 8, 11, 7 (+ padding 8)
    assert wire.tolist() == [15 | 1 << 4, 8 | 11 << 4, 7 | 8 << 4]
    assert wire.tolist() == [0x1F, 0xB8, 0x87]
    assert codec.extract(wire, scales, 5).tolist() == [7.0, -7.0, 0.0, 3.0, -1.0]
    # The wire is read exactly so: every byte decodes, nibble 0 is level -8 (never sent).
    forged = torch.tensor([0x80, 0xF0], dtype=torch.uint8)
    assert codec.extract(forged, scales, 3).tolist() == [-8.0, 0.0, -8.0]


def test_sign_packing_hand_computed():
    """One bit per value, least significant bit first, 1 for >= 0; the scale is the mean
    magnitude of the block's nonzero entries. A zero is sent as +scale (one bit cannot say 0;
    error feedback keeps the difference)."""
    codec = get_value_codec("sign")
    values = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.0, 5.0, -6.0, 7.0, 8.0, -9.0])
    wire, scales = codec.compress(values)
    assert scales.tolist() == [5.0]  # (1 + 2 + ... + 9) / 9 nonzero entries
    # bits 1,0,1,0,1,1,0,1 | 1,0 (padding bits 0)
    assert wire.tolist() == [0b10110101, 0b00000001]
    back = codec.extract(wire, scales, 10)
    assert back.tolist() == [5.0, -5.0, 5.0, -5.0, 5.0, 5.0, -5.0, 5.0, 5.0, -5.0]


def test_sign_packing_across_blocks():
    codec = get_value_codec("sign")
    values = torch.cat([torch.full((64,), -2.0), torch.full((3,), 4.0)])
    wire, scales = codec.compress(values)
    assert scales.tolist() == [2.0, 4.0]
    assert wire.tolist() == [0] * 8 + [0b111]
    assert torch.equal(codec.extract(wire, scales, 67), values)


@pytest.mark.parametrize("count", COUNTS)
def test_sign_codec_sends_the_sign_times_the_block_mean_magnitude(count):
    codec = get_value_codec("sign")
    values = _values(count, count)
    values[::5] = 0.0  # zeros do not count in the mean
    wire, scales = codec.compress(values)
    back = codec.extract(wire, scales, count)
    per_value = _per_value(scales, count)
    assert torch.equal(back, torch.where(values < 0, -per_value, per_value))
    for block, scale in zip(_blocks(values), scales.tolist(), strict=True):
        nonzero = block[block != 0].double()
        if nonzero.numel() == 0:
            assert scale == MIN_SCALE
            continue
        mean = float(nonzero.abs().mean())
        # fp32 sum of up to 64 terms, then one division: within 65 roundings of the mean
        assert abs(scale - mean) <= 65 * FP32_UNIT_ROUNDOFF * mean


@pytest.mark.parametrize("name", BLOCK_CODECS)
def test_all_zero_blocks_send_a_positive_scale(name):
    """An all-zero block has scale MIN_SCALE (never 0, so a zero scale on the wire is always
    a forgery); int8 and int4 decode it to exactly 0, sign to +MIN_SCALE."""
    codec = get_value_codec(name)
    values = torch.zeros(64 * 3 + 5)
    values[64:128] = torch.randn(64, generator=_generator(5))  # only the second block is not 0
    wire, scales = codec.compress(values)
    assert scales[0] == scales[2] == scales[3] == MIN_SCALE and scales[1] > MIN_SCALE
    back = codec.extract(wire, scales, values.numel())
    zero = torch.ones_like(values, dtype=torch.bool)
    zero[64:128] = False
    if name == "sign":
        assert bool((back[zero] == MIN_SCALE).all())
    else:
        assert torch.equal(back[zero], torch.zeros(int(zero.sum())))
        assert not bool(back[zero].signbit().any())  # +0, not -0
    wire, scales = codec.compress(torch.zeros(1))
    assert scales.tolist() == [MIN_SCALE]


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_int_codecs_send_only_the_honest_level_range(name):
    codec = get_value_codec(name)
    wire, _ = codec.compress(_values(3, 1001))
    if name == "int8":
        assert int(wire.min()) >= -127 and int(wire.max()) <= 127
    else:
        nibbles = torch.stack([wire & 0x0F, wire >> 4], dim=1).reshape(-1)
        assert int(nibbles.min()) >= 1 and int(nibbles.max()) <= 15
        assert int(wire[-1]) >> 4 == 8  # the padding nibble of an odd count is level 0


def test_sign_padding_bits_are_zero():
    codec = get_value_codec("sign")
    wire, _ = codec.compress(torch.ones(11))
    assert wire.tolist() == [0xFF, 0b111]


@pytest.mark.parametrize("name", BLOCK_CODECS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_block_codecs_accept_half_precision_and_non_contiguous_input(name, dtype):
    codec = get_value_codec(name)
    values = torch.randn(10, 13, generator=_generator(2)).to(dtype).t()  # non-contiguous
    wire, scales = codec.compress(values)
    wire32, scales32 = codec.compress(values.float().contiguous())
    assert torch.equal(wire, wire32) and torch.equal(scales, scales32)


@pytest.mark.parametrize("name", sorted(VALUE_CODECS))
def test_decoding_is_bit_identical(name):
    """Decoding twice, applying with add_to to two clones, and to_dense all give the same bits:
    the server and every node apply a published delta identically."""
    codec = get_value_codec(name)
    g = _generator(4)
    target = torch.randn(9, 23, generator=g)
    indices = torch.tensor(
        sorted(torch.randperm(207, generator=g)[:77].tolist()), dtype=torch.int32
    )
    for delta in (
        SparseDelta.encode(torch.randn(77, generator=g), codec, indices),
        SparseDelta.encode(torch.randn(9, 23, generator=g), codec),
    ):
        first, second = delta.decoded(), delta.decoded("cpu")
        assert first.dtype == torch.float32 and first.shape == (delta.count,)
        assert torch.equal(first.view(torch.int32), second.view(torch.int32))
        a, b = target.clone(), target.clone()
        delta.add_to(a)
        delta.add_to(b)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
        expected = target.clone()
        if delta.is_dense:
            expected.view(-1).add_(first)
        else:
            expected.view(-1)[indices.long()] += first
        assert torch.equal(a, expected)
        dense = delta.to_dense((9, 23))
        assert torch.equal(dense + target, a)
        c = target.clone()
        delta.add_to(c, alpha=-1.0)  # one IEEE subtraction per entry
        assert torch.equal(c, target - dense)


@pytest.mark.parametrize("name", BLOCK_CODECS)
def test_sparse_delta_encode_and_nbytes_for_block_codecs(name):
    codec = get_value_codec(name)
    indices = torch.arange(0, 300, 3, dtype=torch.int32)  # 100 entries: 2 blocks
    values = torch.randn(100, generator=_generator(6))
    sparse = SparseDelta.encode(values, codec, indices)
    wire, scales = codec.compress(values)
    assert sparse.count == sparse.nnz == 100 and not sparse.is_dense
    assert torch.equal(sparse.values, wire) and torch.equal(sparse.scales, scales)
    assert sparse.nbytes == wire.numel() * wire.element_size() + 2 * 4 + 100 * 4
    assert torch.equal(sparse.decoded(), codec.extract(wire, scales, 100))
    dense = SparseDelta.encode(values.reshape(4, 25), codec)
    assert dense.is_dense and dense.count == 100 and dense.values.dim() == 1
    assert dense.nbytes == wire.numel() * wire.element_size() + 2 * 4
    assert torch.equal(dense.to_dense((4, 25)).reshape(-1), sparse.decoded())
    with pytest.raises(ValueError, match="count"):
        SparseDelta(None, wire, scales, codec)  # a dense block-codec delta needs its count


@pytest.mark.parametrize("name", BLOCK_CODECS)
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_block_codec_error_feedback_eventually_sends_everything(name, density):
    """Over many rounds, what was asked is sent: the sum of everything sent plus the final
    residual equals the sum of the inputs (to fp32 rounding, accumulated over the rounds)."""
    codec = get_value_codec(name)
    compressor = TopKCompressor(density, codec, seed=2)
    g = _generator(9)
    shape = (7, 19)  # 133 entries: two full blocks and a partial one
    rounds = 40
    asked = torch.zeros(shape, dtype=torch.float64)
    sent = torch.zeros(shape, dtype=torch.float64)
    largest_input = largest = 0.0
    for step in range(rounds):
        x = torch.randn(shape, generator=g) * (1.0 + step % 3)
        accumulated = x + compressor.residuals.get("w", torch.zeros(shape))
        largest_input = max(largest_input, float(x.abs().max()))
        largest = max(largest, float(accumulated.abs().max()))
        asked += x.double()
        sent += compressor.compress({"w": x})["w"].to_dense(shape).double()
    residual = compressor.residuals["w"].double()
    # Per round two fp32 roundings: `input + residual` (at most half an ulp of `largest`) and
    # `a - q(a)` (|a - q(a)| <= 2 x largest: the sign codec's q(a) is a block mean magnitude).
    tolerance = rounds * 3 * FP32_UNIT_ROUNDOFF * largest
    assert float((sent + residual - asked).abs().max()) <= tolerance
    # error feedback keeps what waits bounded: it does not grow with the rounds
    assert largest <= 3 * largest_input
    if name != "sign":
        # drain: with zero input the int codecs send the residual down to a tiny remainder
        for _ in range(60):
            compressor.compress({"w": torch.zeros(shape)})
        assert float(compressor.residuals["w"].abs().max()) <= 1e-3 * largest


# ---- the codec registry ----------------------------------------------------------------------


def _registry_error_for_an_unregistered_codec() -> str:
    """Define a concrete codec without registering it; the message of the check's error.

    Everything that refers to the class (the class, the exception and its traceback, whose
    frames hold the check's locals) stays inside this function, so after it returns and a
    collection the class is gone from ValueCodec's subclasses.
    """

    class RogueCodec(FloatCodec):
        name = "rogue"
        wire_dtype = torch.float32

    try:
        codecs_module._check_registry()
    except RuntimeError as exc:
        return str(exc)
    finally:
        del RogueCodec
    return ""


def _all_subclass_names() -> set[str]:
    return {cls.__name__ for cls in codecs_module._concrete_subclasses(ValueCodec)}


def test_check_registry_passes_for_the_shipped_codecs():
    gc.collect()  # codec classes other tests defined and dropped
    codecs_module._check_registry()
    registered = {type(codec).__name__ for codec in VALUE_CODECS.values()}
    assert _all_subclass_names() == registered


def test_check_registry_refuses_an_unregistered_codec_class():
    message = _registry_error_for_an_unregistered_codec()
    assert "without a registered wire name" in message and "RogueCodec" in message
    gc.collect()  # a class sits in reference cycles (its __mro__, its descriptors)
    assert "RogueCodec" not in _all_subclass_names()
    codecs_module._check_registry()  # nothing leaked into the next test


def test_check_registry_ignores_abstract_codec_classes():
    def define_and_check() -> None:
        class HalfWritten(ValueCodec):  # no name, abstract methods left: never instantiated
            pass

        class NamedButAbstract(BlockCodec):  # a name, but no _levels / _pack / _unpack
            name = "int2"
            wire_dtype = torch.uint8
            bits = 2

        codecs_module._check_registry()
        del HalfWritten, NamedButAbstract

    define_and_check()
    gc.collect()
    left = {cls.__name__ for cls in ValueCodec.__subclasses__() + BlockCodec.__subclasses__()}
    assert not {"HalfWritten", "NamedButAbstract"} & left


def test_check_registry_refuses_a_codec_under_another_name(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setitem(VALUE_CODECS, "int9", VALUE_CODECS["int8"])
        with pytest.raises(RuntimeError, match=r"Int8Codec registered as 'int9'"):
            codecs_module._check_registry()
    assert "int9" not in VALUE_CODECS
    codecs_module._check_registry()


def test_check_registry_accepts_a_registered_new_codec(monkeypatch):
    def define_register_and_check() -> None:
        class Float64Codec(FloatCodec):
            name = "fp64"
            wire_dtype = torch.float64

        with monkeypatch.context() as patch:
            patch.setitem(VALUE_CODECS, "fp64", Float64Codec())
            codecs_module._check_registry()
            assert get_value_codec("fp64").estimate_compression_ratio() == 0.5
        del Float64Codec

    define_register_and_check()
    gc.collect()
    assert "fp64" not in VALUE_CODECS and "Float64Codec" not in _all_subclass_names()
    codecs_module._check_registry()
