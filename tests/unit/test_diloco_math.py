"""DiLoCo: the node's inner loop and the server's outer step."""

from __future__ import annotations

import numpy as np
import torch

from crowdtrain.algorithms.optimizers import OptimizerConfig, build_optimizer
from crowdtrain.algorithms.strategies import DiLoCoStrategy, build_strategy
from crowdtrain.data.batches import BatchSampler
from crowdtrain.model.gpt import GPT, GPTConfig
from crowdtrain.node.trainer import DiLoCoTrainer

CONFIG = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)


def test_inner_loop_sends_start_minus_end_and_leaves_the_replica_alone():
    torch.manual_seed(0)
    replica = GPT(CONFIG)
    start = {n: p.detach().clone() for n, p in replica.named_parameters()}
    tokens = np.random.default_rng(0).integers(0, 64, 2000).astype(np.uint16)
    trainer = DiLoCoTrainer(
        replica,
        BatchSampler(tokens, 4, 16, seed=1),
        torch.device("cpu"),
        inner_steps=5,
        inner_lr=1e-2,
    )
    first = trainer.compute_update()
    assert first.samples == 5 * 4 and first.tokens == 5 * 4 * 16
    local = dict(trainer.local.named_parameters())
    for name, p in replica.named_parameters():
        assert torch.equal(p.detach(), start[name])  # the replica is never stepped
        assert torch.allclose(first.gradients[name], start[name] - local[name].detach())
    assert any(g.abs().sum() > 0 for g in first.gradients.values())
    trainer.compute_update()  # the next round starts again from the replica ...
    step_counts = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert step_counts == {10}  # ... and the inner AdamW keeps its state across rounds


def test_outer_step_is_nesterov_sgd_on_the_mean_pseudo_gradient():
    torch.manual_seed(0)
    params = {"w": torch.nn.Parameter(torch.randn(4, 3))}
    reference = torch.nn.Parameter(params["w"].detach().clone())
    cfg = OptimizerConfig(name="nesterov", lr=0.7, momentum=0.9, weight_decay=0.0)
    optimizer = build_optimizer(params.values(), cfg)
    expected = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    strategy = build_strategy("diloco", inner_steps=7, inner_lr=1e-3)
    assert isinstance(strategy, DiLoCoStrategy)
    assert strategy.node_instructions() == {
        "algorithm": "diloco",
        "update_kind": "pseudo_gradient",
        "inner_steps": 7,
        "inner_lr": 1e-3,
    }
    for step in range(3):
        pseudo = torch.randn(4, 3) * (step + 1)
        strategy.step(params, optimizer, {"w": pseudo.clone()}, lr=0.7)
        reference.grad = pseudo.clone()
        expected.step()
        assert torch.allclose(params["w"].detach(), reference.detach())
