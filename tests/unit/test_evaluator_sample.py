"""The server's Evaluator scores on its own valid split: its loss equals a direct computation
on the same fixed sample, made here from the split's documents (not from its shards)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from crowdtrain.data.batches import BatchSampler
from crowdtrain.model.gpt import GPT
from crowdtrain.server.runtime import DEFAULT_DATASET, EVAL_TOKENS, ServerRuntime
from crowdtrain.settings import ServerSettings


def test_evaluator_loss_equals_a_direct_computation(tmp_path):
    settings = ServerSettings(data_dir=tmp_path, eval_batches=3, eval_batch_size=4)
    runtime = ServerRuntime(settings)
    try:
        record = runtime.evaluator.evaluate_now()

        tokenizer = runtime.tokenizer
        ids: list[int] = []
        for document in runtime.store.documents(DEFAULT_DATASET, "valid"):
            ids += tokenizer.encode(document) + [tokenizer.eot_id]
        tokens = np.array(ids[:EVAL_TOKENS], dtype=np.int64)
        version, params = runtime.coordinator.snapshot()
        model = GPT(runtime.config)
        model.load_state_dict(params, strict=False)
        model.eval()
        sampler = BatchSampler(tokens, 4, runtime.config.block_size, seed=0)
        losses = []
        with torch.no_grad():
            for _ in range(3):
                x, y = sampler.next()
                logits, _ = model(x, y)
                losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
        expected = sum(losses) / len(losses)

        assert record["version"] == version == 0
        assert math.isclose(record["valid_loss"], expected, rel_tol=1e-6)
        assert record["valid_perplexity"] == math.exp(record["valid_loss"])
        assert record["dataset"] == DEFAULT_DATASET
        assert record["sample_tokens"] == 3 * 4 * runtime.config.block_size
        assert runtime.evals.last()["valid_loss"] == record["valid_loss"]
        # the untrained model is close to uniform over the vocabulary
        assert abs(expected - math.log(runtime.config.vocab_size)) < 1.0
    finally:
        runtime.db.close()
