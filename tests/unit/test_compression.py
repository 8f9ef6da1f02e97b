"""Unit tests for value codecs, top-k selection and the error-feedback TopKCompressor."""

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
from crowdtrain.compression.topk import EXACT_TOPK_MAX_NUMEL

# Round-to-nearest bounds: relative error at most the unit roundoff (2^-p for p significand
# bits) in the normal range; below it the absolute error is half the smallest subnormal step.
FP16_REL, FP16_SMALLEST_NORMAL, FP16_ABS = 2.0**-11, 2.0**-14, 2.0**-25
BF16_REL = 2.0**-8


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _values(seed: int = 0, n: int = 4096) -> torch.Tensor:
    """fp32 values across many magnitudes (tiny, ordinary, large) and both signs."""
    g = _generator(seed)
    scales = torch.tensor([1e-7, 1e-4, 1e-2, 1.0, 1e2, 1e4])
    return torch.randn(n, generator=g) * scales[torch.randint(len(scales), (n,), generator=g)]


def _dense_sent(delta: SparseDelta, codec, shape) -> torch.Tensor:
    """What the receiver reconstructs: fp32 values scattered into a zero tensor of `shape`."""
    return SparseDelta(delta.indices, codec.extract(delta.values)).to_dense(shape)


# ---- value codecs -----------------------------------------------------------------------


def test_registry_names_match_codec_names():
    assert set(VALUE_CODECS) == {"fp32", "fp16", "bf16"}
    for name, codec in VALUE_CODECS.items():
        assert codec.name == name
        assert get_value_codec(name) is codec


def test_unknown_codec_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown value codec 'int3'.*bf16, fp16, fp32"):
        get_value_codec("int3")


@pytest.mark.parametrize("name, ratio", [("fp32", 1.0), ("fp16", 2.0), ("bf16", 2.0)])
def test_compression_ratio_and_wire_dtype(name, ratio):
    codec = get_value_codec(name)
    assert codec.estimate_compression_ratio() == ratio
    wire = codec.compress(_values())
    assert wire.dtype == codec.wire_dtype
    assert codec.extract(wire).dtype == torch.float32


def test_fp32_round_trip_is_exact():
    codec = get_value_codec("fp32")
    values = _values()
    assert torch.equal(codec.extract(codec.compress(values)), values)


def test_fp16_round_trip_within_half_precision():
    codec = get_value_codec("fp16")
    values = _values()
    back = codec.extract(codec.compress(values))
    error = (back - values).abs()
    normal = values.abs() >= FP16_SMALLEST_NORMAL
    assert normal.any() and (~normal).any()  # both regimes are exercised
    assert bool((error[normal] <= FP16_REL * values.abs()[normal]).all())
    assert bool((error[~normal] <= FP16_ABS).all())


def test_fp16_clamps_instead_of_overflowing():
    codec = get_value_codec("fp16")
    wire = codec.compress(torch.tensor([1e6, -1e6, 65504.0, 7.0]))
    assert torch.equal(wire, torch.tensor([65504.0, -65504.0, 65504.0, 7.0], dtype=torch.float16))


def test_bf16_round_trip_within_bfloat_precision():
    codec = get_value_codec("bf16")
    values = torch.cat([_values(), torch.tensor([1e30, -1e-30, 3e38])])
    back = codec.extract(codec.compress(values))
    assert bool(((back - values).abs() <= BF16_REL * values.abs()).all())


@pytest.mark.parametrize("name", sorted(VALUE_CODECS))
def test_empty_tensor_round_trips(name):
    codec = get_value_codec(name)
    wire = codec.compress(torch.empty(0))
    assert wire.dtype == codec.wire_dtype and wire.numel() == 0
    assert codec.extract(wire).shape == (0,)


@pytest.mark.parametrize("name", sorted(VALUE_CODECS))
def test_bf16_input_round_trips(name):
    """bf16 values (ordinary magnitudes) survive every codec exactly: each wire dtype holds them."""
    codec = get_value_codec(name)
    values = (torch.randn(1000, generator=_generator(1)) * 10).to(torch.bfloat16)
    back = codec.extract(codec.compress(values))
    assert back.dtype == torch.float32
    assert torch.equal(back, values.float())


def test_fp16_clamps_large_bf16_input():
    codec = get_value_codec("fp16")
    wire = codec.compress(torch.tensor([1e5, -1e5], dtype=torch.bfloat16))
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


@pytest.mark.parametrize("codec_name", sorted(VALUE_CODECS))
@pytest.mark.parametrize("density", [0.01, 0.1, 1.0])
def test_error_feedback_invariant_is_exact(codec_name, density):
    """sent + new residual == input + old residual, bit for bit, over several steps.

    Exact (torch.equal), not approximate: at a sent entry the residual is `a - q(a)`, where q(a)
    is `a` rounded to the wire dtype and so within a factor of two of `a`; by Sterbenz's lemma
    that subtraction is exact in fp32, and so is `q(a) + (a - q(a)) == a`. Entries not sent
    keep `a` itself. The inputs stay below fp16's clamp, where the lemma would not hold.
    """
    codec = get_value_codec(codec_name)
    compressor = TopKCompressor(density, codec, seed=1)
    g = _generator(7)
    shapes = {"w": (32, 48), "b": (48,), "empty": (0,)}
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
            got = _dense_sent(delta, codec, shape) + compressor.residuals[name]
            assert torch.equal(got, expected), (codec_name, density, step, name)
            assert delta.values.dtype == codec.wire_dtype
            numel = expected.numel()
            if density == 1.0:
                assert delta.is_dense and delta.values.shape == shape
            elif numel:
                assert delta.indices.dtype == torch.int32
                assert delta.nnz == math.ceil(density * numel)
                assert bool((delta.indices[1:] > delta.indices[:-1]).all())


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


@pytest.mark.parametrize("density", [0.05, 1.0])
@pytest.mark.parametrize("codec_name", ["fp16", "bf16"])
def test_restore_puts_a_refused_update_back(density, codec_name):
    codec = get_value_codec(codec_name)
    compressor = TopKCompressor(density, codec, seed=3)
    g = _generator(11)
    compressor.compress({"w": torch.randn(20, 30, generator=g)})
    old = compressor.residuals["w"].clone()
    x = torch.randn(20, 30, generator=g)
    sent = compressor.compress({"w": x})
    assert not torch.equal(compressor.residuals["w"], x + old)
    compressor.restore(sent)
    # Exact for the same reason as the invariant: (a - q(a)) + q(a) == a in fp32.
    assert torch.equal(compressor.residuals["w"], x + old)


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
