"""Supervised fine-tuning with real processes: an annotated dataset of instruction pairs and
chats, imported with the CLI; the server runs --objective sft, the node trains on the masked
shards, and the loss on the responses falls."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from crowdtrain.data.corpus import default_corpus

pytestmark = pytest.mark.slow


def write_records(path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(count):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            if i % 2:
                record = {
                    "prompt": f"What is {a} plus {b}?",
                    "response": f"{a} plus {b} is {a + b}.",
                }
            else:
                record = {
                    "messages": [
                        {"role": "system", "content": "You add numbers."},
                        {"role": "user", "content": f"Add {a} and {b}."},
                        {"role": "assistant", "content": f"The sum is {a + b}."},
                    ]
                }
            handle.write(json.dumps(record) + "\n")


def run_cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "crowdtrain", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_sft_round_trains_on_annotated_shards(e2e):
    records = e2e.root / "pairs.jsonl"
    write_records(records, 400, seed=0)
    corpus = default_corpus()
    texts = e2e.root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus.train[:30]))
    valid = e2e.root / "valid.jsonl"
    valid.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus.valid[:5]))
    data_dir = str(e2e.data_dir)
    for path, split in ((records, "annotated"), (texts, "train"), (valid, "valid")):
        run_cli(
            "data", "import", str(path), "--dataset", "qa", "--split", split, "--data-dir", data_dir
        )
    shown = json.loads(run_cli("data", "show", "qa", "--json", "--data-dir", data_dir))
    annotated = next(s for s in shown["splits"] if s["name"] == "annotated")
    assert annotated["documents"] == len(set(records.read_text().splitlines()))

    e2e.start_server(dataset="qa", objective="sft", shard_tokens=4096, eval_every=100)
    info = e2e.get("/info")
    assert info["training"]["objective"] == "sft"
    assert info["data"]["split"] == "annotated"
    assert info["tokenizer"]["chat_template"]["assistant"] == "<|assistant|>\n"

    e2e.start_nodes(1, "--max-updates", "40")
    node = e2e.swarm.nodes[0]
    node.wait(timeout=240)
    assert node.returncode == 0, e2e.logs()

    rounds = e2e.get("/history")["rounds"]
    assert len(rounds) >= 20, e2e.logs()
    first = sum(r["train_loss"] for r in rounds[:5]) / 5
    last = sum(r["train_loss"] for r in rounds[-5:]) / 5
    print("sft response loss", first, "->", last)
    assert last < first - 1.0, (first, last)
    coverage = e2e.get("/data/epochs/0")
    assert coverage["completed"] == coverage["shards"] and coverage["duplicates"] == []
