"""Unit tests for aggregators, optimizers, the learning-rate schedule and strategies."""

import math

import pytest
import torch

from crowdtrain.algorithms.aggregators import WeightedMean, build_aggregator
from crowdtrain.algorithms.optimizers import (
    OptimizerConfig,
    build_optimizer,
    learning_rate,
)
from crowdtrain.algorithms.strategies import SyncStrategy, build_strategy
from crowdtrain.compression import SparseDelta

SHAPES = {"w": (6, 7), "b": (7,)}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_update(seed: int, dense: bool, density: float = 0.3) -> dict[str, SparseDelta]:
    """One node's update: dense fp32, or sparse int32 indices with fp16 values."""
    g = _generator(seed)
    out = {}
    for name, shape in SHAPES.items():
        numel = math.prod(shape)
        if dense:
            out[name] = SparseDelta(None, torch.randn(shape, generator=g))
        else:
            k = max(1, int(density * numel))
            indices = torch.randperm(numel, generator=g)[:k].sort().values.to(torch.int32)
            out[name] = SparseDelta(indices, torch.randn(k, generator=g).half())
    return out


def dense_reference(updates: list[tuple[dict[str, SparseDelta], float]]) -> dict:
    """sum_i w_i x_i / sum_i w_i in float64, each x_i materialised by plain indexing."""
    total = sum(w for _, w in updates)
    out = {}
    for name, shape in SHAPES.items():
        acc = torch.zeros(math.prod(shape), dtype=torch.float64)
        for deltas, weight in updates:
            delta = deltas[name]
            if delta.indices is None:
                acc += weight * delta.values.double().reshape(-1)
            else:
                for i, v in zip(
                    delta.indices.tolist(), delta.values.double().tolist(), strict=True
                ):
                    acc[i] += weight * v
        out[name] = (acc / total).reshape(shape)
    return out


def test_weighted_mean_equals_the_dense_reference():
    updates = [
        (random_update(1, dense=False), 16.0),
        (random_update(2, dense=True), 4.0),
        (random_update(3, dense=False, density=0.9), 1.0),
        (random_update(4, dense=True), 7.0),
    ]
    aggregator = build_aggregator("mean", SHAPES)
    assert isinstance(aggregator, WeightedMean)
    for deltas, weight in updates:
        aggregator.add(deltas, weight)
    assert aggregator.count == 4 and aggregator.total_weight == 28.0
    result = aggregator.result()
    expected = dense_reference(updates)
    for name, shape in SHAPES.items():
        assert result[name].shape == shape and result[name].dtype == torch.float32
        # fp32 accumulation of a handful of terms against a float64 reference
        torch.testing.assert_close(result[name].double(), expected[name], rtol=1e-6, atol=1e-6)


def test_weighted_mean_of_one_update_is_that_update():
    deltas = random_update(5, dense=False)
    aggregator = WeightedMean(SHAPES)
    aggregator.add(deltas, 3.0)
    result = aggregator.result()
    for name, shape in SHAPES.items():
        # (3 * x) / 3 is exact: x has an 11-bit significand, so 3 * x fits in fp32
        assert torch.equal(result[name], deltas[name].to_dense(shape))


def test_a_parameter_left_out_counts_as_zero():
    aggregator = WeightedMean(SHAPES)
    aggregator.add({"b": SparseDelta(None, torch.ones(7))}, 1.0)
    aggregator.add({"w": SparseDelta(None, torch.ones(6, 7))}, 1.0)
    result = aggregator.result()
    assert torch.equal(result["b"], torch.full((7,), 0.5))
    assert torch.equal(result["w"], torch.full((6, 7), 0.5))


def test_result_resets_the_round():
    aggregator = WeightedMean(SHAPES)
    aggregator.add(random_update(1, dense=True), 2.0)
    aggregator.result()
    assert aggregator.count == 0 and aggregator.total_weight == 0.0
    with pytest.raises(ValueError, match="without updates"):
        aggregator.result()
    second = random_update(2, dense=True)
    aggregator.add(second, 5.0)
    result = aggregator.result()
    for name in SHAPES:
        # nothing of the first round is left: the result is exactly the second update
        torch.testing.assert_close(result[name], second[name].values, rtol=1e-6, atol=0)


def test_each_round_starts_from_zero_although_results_reuse_the_buffers():
    # result() hands out its own buffers (no 500 MB copy per round for gpt2-124m); they are
    # valid until the next add(), and the next round must not see the previous one
    aggregator = WeightedMean(SHAPES)
    aggregator.add(random_update(1, dense=True), 1.0)
    aggregator.result()
    second = random_update(2, dense=True)
    aggregator.add(second, 2.0)
    result = aggregator.result()
    for name in SHAPES:
        assert torch.equal(result[name], second[name].values.float().reshape(SHAPES[name]))


def test_empty_round_raises():
    with pytest.raises(ValueError, match="without updates"):
        WeightedMean(SHAPES).result()


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan")])
def test_non_positive_weight_raises(weight):
    aggregator = WeightedMean(SHAPES)
    with pytest.raises(ValueError, match="positive"):
        aggregator.add(random_update(1, dense=True), weight)
    assert aggregator.count == 0 and aggregator.total_weight == 0.0


@pytest.mark.parametrize(
    "build, pattern",
    [
        (lambda: build_aggregator("median", SHAPES), r"unknown aggregator 'median'.*: mean"),
        (
            lambda: build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimizerConfig("sgd")),
            r"unknown optimizer 'sgd'.*: adamw, nesterov",
        ),
        (lambda: build_strategy("diloco2"), r"unknown algorithm 'diloco2'.*: diloco, sync"),
    ],
)
def test_unknown_names_list_the_choices(build, pattern):
    with pytest.raises(ValueError, match=pattern):
        build()


def test_build_optimizer_applies_the_config():
    params = [torch.nn.Parameter(torch.zeros(3))]
    cfg = OptimizerConfig("adamw", lr=0.02, weight_decay=0.3, beta1=0.8, beta2=0.9)
    optimizer = build_optimizer(params, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"])) == (0.02, 0.3, (0.8, 0.9))
    nesterov = build_optimizer(params, OptimizerConfig("nesterov", lr=0.1, momentum=0.5))
    assert isinstance(nesterov, torch.optim.SGD)
    assert nesterov.param_groups[0]["nesterov"] and nesterov.param_groups[0]["momentum"] == 0.5


# ---- learning-rate schedule ----------------------------------------------------------------


def test_warmup_is_linear_and_reaches_the_peak():
    assert learning_rate(0, 1.0, warmup=10, decay_versions=None) == pytest.approx(0.1)
    assert learning_rate(4, 1.0, warmup=10, decay_versions=None) == pytest.approx(0.5)
    assert learning_rate(9, 1.0, warmup=10, decay_versions=None) == pytest.approx(1.0)
    assert learning_rate(10, 1.0, warmup=10, decay_versions=None) == 1.0
    assert learning_rate(10_000, 1.0, warmup=10, decay_versions=None) == 1.0


def test_no_warmup_starts_at_the_peak():
    assert learning_rate(0, 3e-3, warmup=0, decay_versions=None) == 3e-3


def test_cosine_endpoints_and_midpoint():
    lr = 2.0
    assert learning_rate(10, lr, warmup=10, decay_versions=110) == pytest.approx(lr)
    # halfway through the decay the cosine factor is 1/2: min + (1 - min) / 2
    assert learning_rate(60, lr, warmup=10, decay_versions=110, min_ratio=0.1) == pytest.approx(
        lr * 0.55
    )
    assert learning_rate(110, lr, warmup=10, decay_versions=110) == pytest.approx(lr * 0.1)
    assert learning_rate(5_000, lr, warmup=10, decay_versions=110) == pytest.approx(lr * 0.1)
    values = [learning_rate(v, lr, 10, 110) for v in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


# ---- strategies ----------------------------------------------------------------------------


def _model_and_grads(seed: int):
    g = _generator(seed)
    params = {
        name: torch.nn.Parameter(torch.randn(shape, generator=g)) for name, shape in SHAPES.items()
    }
    grads = [{name: torch.randn(shape, generator=g) * 5 for name, shape in SHAPES.items()}]
    grads.append({name: torch.randn(shape, generator=g) * 0.01 for name, shape in SHAPES.items()})
    return params, grads


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_sync_step_equals_adamw_on_clipped_gradients(grad_clip):
    params, rounds = _model_and_grads(0)
    reference = {name: p.detach().clone().requires_grad_(True) for name, p in params.items()}
    cfg = OptimizerConfig("adamw", lr=1.0, weight_decay=0.1, beta1=0.9, beta2=0.95)
    optimizer = build_optimizer(params.values(), cfg)
    reference_optimizer = torch.optim.AdamW(
        reference.values(), lr=1.0, betas=(0.9, 0.95), weight_decay=0.1, foreach=False
    )
    strategy = SyncStrategy(grad_clip=grad_clip)
    assert strategy.node_instructions() == {"algorithm": "sync", "update_kind": "gradient"}

    for step, combined in enumerate(rounds):
        lr = 0.01 * (step + 1)
        # by hand: the global norm over every parameter, scaled down to grad_clip when above it
        norm = torch.cat([g.reshape(-1) for g in combined.values()]).norm().item()
        scale = min(1.0, grad_clip / (norm + 1e-6)) if grad_clip > 0 else 1.0
        if step == 0 and grad_clip > 0:
            assert scale < 0.1  # the first round's gradient is far above the clip
        for name, p in reference.items():
            p.grad = combined[name].clone() * scale
        for group in reference_optimizer.param_groups:
            group["lr"] = lr
        reference_optimizer.step()

        strategy.step(params, optimizer, {n: g.clone() for n, g in combined.items()}, lr)
        assert optimizer.param_groups[0]["lr"] == lr
        for name, p in params.items():
            assert p.grad is None
            torch.testing.assert_close(p.detach(), reference[name].detach(), rtol=1e-6, atol=1e-6)


def test_nesterov_without_momentum_is_plain_sgd():
    """outer_momentum 0 is a valid setting: the outer step is then params -= lr x mean."""
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    cfg = OptimizerConfig("nesterov", lr=1.0, momentum=0.0, weight_decay=0.0)
    sgd = build_optimizer([param], cfg)
    assert not sgd.param_groups[0]["nesterov"]
    param.grad = torch.tensor([0.25, 0.5])
    sgd.step()
    assert torch.equal(param.detach(), torch.tensor([0.75, -2.5]))
