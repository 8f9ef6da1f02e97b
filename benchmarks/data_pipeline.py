"""What does the data pipeline cost on top of the work it cannot avoid?

On a generated corpus (deterministic JSON Lines of made-up words with a Zipf-like frequency, so
that BPE merges look like those of real text; 1% exact duplicate documents), each stage against
a baseline measured in the same run, alternating A-B-B-A so that drift on a shared machine hits
both alike; a ratio is store / baseline throughput (1.0: no overhead, 0.5: twice as slow):

1. import: `DataStore.import_path` of the corpus directory (source sha256, document hashes and
   dedup, zstd part files with fsync, the one database transaction) against reading the same
   documents with the importers alone (`find_sources` + `read_documents`), in MB/s of source;
2. tokenization: `DataStore.tokenized` (reads the parts back, encodes, cuts and writes the
   shards with their sha256) against `Tokenizer.encode_batch` over the same documents in the
   same batches, in tokens/s; a 4096-token BPE trained on a sample beforehand (not timed);
3. node batches: `SequentialBatches` over each memmapped shard (what `ShardFeed` reads) against
   `BatchSampler` over the same tokens in memory, in batches/s of 16 x 128;
4. shard serving: the server's read + `encoding.compress(zstd)` plus the node's
   `encoding.decompress` + sha256 check, against a plain read of the same shard files, in MB/s
   of token bytes; and the compression ratio of token shards;
5. memory: peak RSS of a fresh process importing the whole corpus, a quarter of it (in as many
   files, and in MANY_FILES files), only reading it, and reading it into a list (the control),
   against the corpus size: an import that streams stays flat as the bytes grow.

Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zstandard

from _common import WorkDir, log, machine, ratio, run_benchmark
from crowdtrain.data.batches import BatchSampler, SequentialBatches
from crowdtrain.data.importers import ImportOptions, find_sources, read_documents
from crowdtrain.data.shards import ENCODE_BATCH, TokenizationInfo, load_shard
from crowdtrain.data.store import DataStore
from crowdtrain.model.tokenizer import Tokenizer
from crowdtrain.protocol import encoding
from crowdtrain.settings import ServerSettings

MB = 1 << 20
DATASET = "bench"
SPLIT = "train"
FILES = 8  # the corpus is this many .jsonl files
MANY_FILES = 128  # the memory run also imports a quarter of the corpus cut into this many
DUPLICATE_EVERY = 100  # every 100th document repeats an earlier one: dedup has work to do
VOCABULARY_WORDS = 30_000
QUICK_MB = 4
ONSETS = tuple("bcdfghjklmnprstvwz") + ("ch", "sh", "th", "st", "tr", "pl", "br", "gr", "kl", "sp")
ASCII_NUCLEI = tuple("aeiouy") + ("ai", "ea", "ou", "io", "ee", "oo")
NUCLEI = ASCII_NUCLEI * 5 + tuple("éüö")  # 1 syllable in 21 has a non-ASCII letter
CODAS = ("",) * 6 + tuple("nrstlmx") + ("nd", "st", "ng", "rk")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Import, tokenization, node batches, shard serving and import memory of "
        "the data store on a generated corpus, each against its bare baseline; prints JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--mb", type=float, default=48.0, help="corpus size in MB of JSON Lines")
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run: a {QUICK_MB} MB corpus, 1 repeat"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="A-B pairs per stage (ratio: median of the pairs)"
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=ServerSettings.model_fields["shard_tokens"].default,
        help="tokens per shard (the server default)",
    )
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument(
        "--tokenizer-sample-mb", type=float, default=2.0, help="text the tokenizer is trained on"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per node batch")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0, help="corpus generator seed")
    parser.add_argument("--keep", type=str, default=None, help="keep corpus and stores here")
    args = parser.parse_args(argv)
    if args.quick:
        args.mb, args.repeats, args.tokenizer_sample_mb = QUICK_MB, 1, 1.0
    if args.mb <= 0 or args.repeats < 1:
        parser.error("--mb must be positive and --repeats at least 1")
    return args


# ------------------------------------------------------------------------------------ corpus


class TextGenerator:
    """Sentences of made-up words drawn with Zipf-like frequencies (the frequent ones short, as
    in real text), from one seed."""

    PLAIN, COMMA, START, START_COMMA, END, QUESTION = range(6)  # the forms of each word

    def __init__(self, seed: int):
        self.rng = rng = np.random.default_rng(seed)
        # twice the words needed, drawn at once; duplicates dropped
        syllables_per_word = rng.choice([1, 1, 2, 2, 2, 3, 3, 4], size=2 * VOCABULARY_WORDS)
        total = int(syllables_per_word.sum())
        onsets = np.array(ONSETS, dtype=object)[rng.integers(len(ONSETS), size=total)]
        onsets[rng.random(total) < 0.25] = ""  # a quarter of the syllables start with a vowel
        syllables = (
            onsets
            + np.array(NUCLEI, dtype=object)[rng.integers(len(NUCLEI), size=total)]
            + np.array(CODAS, dtype=object)[rng.integers(len(CODAS), size=total)]
        ).tolist()
        bounds = np.concatenate([[0], np.cumsum(syllables_per_word)]).tolist()
        unique = dict.fromkeys("".join(syllables[a:b]) for a, b in itertools.pairwise(bounds))
        words = list(unique)[:VOCABULARY_WORDS]
        vocabulary = sorted(words, key=lambda word: len(word) + rng.random() * 4)
        for number in rng.integers(0, 3000, size=300):  # numbers, at random ranks
            vocabulary.insert(int(rng.integers(0, len(vocabulary))), str(number))
        self.forms = np.array(
            [
                (w, w + ",", w[0].upper() + w[1:], w[0].upper() + w[1:] + ",", w + ".", w + "?")
                for w in vocabulary
            ],
            dtype=object,
        )
        weights = 1.0 / (np.arange(len(vocabulary)) + 2.7) ** 1.07
        self.cumulative = np.cumsum(weights / weights.sum())

    def document(self) -> str:
        """Sentences of 4-25 words in paragraphs of 2-7 sentences; log-normal length, median
        ~400 words (~2 KB)."""
        rng = self.rng
        target = int(np.clip(rng.lognormal(np.log(400), 0.8), 30, 6000))
        lengths = rng.integers(4, 26, size=target // 4 + 1)
        ends = np.cumsum(lengths)
        ends = ends[: int(np.searchsorted(ends, target)) + 1]
        count = int(ends[-1])
        words = np.minimum(np.searchsorted(self.cumulative, rng.random(count)), len(self.forms) - 1)
        form = np.where(rng.random(count) < 0.08, self.COMMA, self.PLAIN)
        starts = np.concatenate([[0], ends[:-1]])
        form[starts] += self.START
        form[ends - 1] = np.where(rng.random(len(ends)) < 0.9, self.END, self.QUESTION)
        separators = np.full(count, " ", dtype=object)
        paragraph_ends = np.cumsum(rng.integers(2, 8, size=len(ends)))
        separators[ends[paragraph_ends[paragraph_ends < len(ends)] - 1] - 1] = "\n\n"
        pieces = np.empty(2 * count - 1, dtype=object)
        pieces[0::2] = self.forms[words, form]
        pieces[1::2] = separators[:-1]
        return "".join(pieces.tolist())


def generate_corpus(
    directory: Path, megabytes: float, seed: int, files: int = FILES
) -> tuple[dict, list[str]]:
    """`files` .jsonl files of {"id", "text"} records, about `megabytes` in all, 1% of them
    duplicates: their summary, and the documents."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = TextGenerator(seed)
    per_file = megabytes * MB / files
    documents: list[str] = []
    duplicates = 0
    for number in range(files):
        with (directory / f"part-{number:03d}.jsonl").open("w", encoding="utf-8") as file:
            written = 0
            while written < per_file:
                if documents and len(documents) % DUPLICATE_EVERY == DUPLICATE_EVERY - 1:
                    text = documents[int(generator.rng.integers(len(documents)))]
                    duplicates += 1
                else:
                    text = generator.document()
                documents.append(text)
                line = json.dumps({"id": len(documents), "text": text}, ensure_ascii=False)
                written += file.write(line + "\n")
    paths = sorted(directory.glob("*.jsonl"))
    summary = {
        "directory": directory,
        "files": [p.name for p in paths],
        "bytes": sum(p.stat().st_size for p in paths),
        "documents": len(documents),
        "planted_duplicates": duplicates,
        "text_bytes": sum(len(d.encode("utf-8")) for d in documents),
    }
    return summary, documents


def tokenizer_sample(documents: list[str], megabytes: float) -> list[str]:
    """The first documents, about `megabytes` of them: what the BPE is trained on."""
    sample, size = [], 0
    for document in documents:
        if size >= megabytes * MB:
            break
        sample.append(document)
        size += len(document)
    return sample


# -------------------------------------------------------------------------------- measuring


def alternate(tasks: list[tuple[Callable[[], float], Callable[[], float]]]):
    """(measured seconds, baseline seconds) per pair of tasks, run A-B, B-A, A-B ..."""
    pairs = []
    for i, (measured, baseline) in enumerate(tasks):
        if i % 2 == 0:
            a = measured()
            b = baseline()
        else:
            b = baseline()
            a = measured()
        pairs.append((a, b))
    return pairs


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def paired_figures(pairs, amounts: list[float], unit: str) -> dict:
    """Both sides' throughput (all amounts over all seconds) and the median of the pairs'
    ratios measured / baseline throughput (the pairs' baselines ran next to them)."""
    ratios = [b / a for a, b in pairs]  # same amount on both sides: throughput ratio
    measured_s = sum(a for a, _ in pairs)
    baseline_s = sum(b for _, b in pairs)
    return {
        unit: round(sum(amounts) / measured_s, 2),
        f"baseline_{unit}": round(sum(amounts) / baseline_s, 2),
        "ratio": round(statistics.median(ratios), 4),
        "ratio_of_totals": ratio(baseline_s, measured_s),
        "pair_ratios": [round(r, 4) for r in ratios],
        "seconds": [round(a, 3) for a, _ in pairs],
        "baseline_seconds": [round(b, 3) for _, b in pairs],
    }


def read_only(corpus_dir: Path, options: ImportOptions) -> int:
    """The importers alone: every document, parsed and checked, then dropped."""
    count = 0
    for source in find_sources(corpus_dir, options):
        for _ in read_documents(source, options):
            count += 1
    return count


def measure_import(work: Path, corpus: dict, repeats: int) -> dict:
    """import_path of the whole corpus into a fresh store each time vs the importers alone."""
    options = ImportOptions()
    stores: list[Path] = []
    reports = []

    def store_import() -> float:
        directory = work / f"import-{len(stores)}"
        stores.append(directory)
        store = DataStore(directory)
        started = time.perf_counter()
        reports.append(store.import_path(corpus["directory"], DATASET, SPLIT, options))
        seconds = time.perf_counter() - started
        store.db.close()
        return seconds

    def read() -> float:
        return timed(lambda: read_only(corpus["directory"], options))

    pairs = alternate([(store_import, read)] * repeats)
    parts = list((stores[-1] / "datasets" / DATASET / SPLIT / "parts").glob("*.zst"))
    part_bytes = sum(p.stat().st_size for p in parts)
    for store in stores:
        shutil.rmtree(store, ignore_errors=True)
    report = reports[-1]
    figures = paired_figures(pairs, [corpus["bytes"] / MB] * repeats, "mb_per_s")
    figures.update(
        documents_added=report.documents,
        duplicates_dropped=report.duplicates,
        part_files=len(parts),
        part_bytes=part_bytes,
        part_compression_ratio=ratio(report.bytes, part_bytes),
    )
    return figures


def measure_tokenization(
    work: Path, corpus: dict, tokenizer: Tokenizer, shard_tokens: int
) -> tuple[dict, list[TokenizationInfo]]:
    """store.tokenized vs encode_batch on the same documents, one pair per source file (each
    imported as its own dataset, not timed): many short pairs drift less than a few long ones."""
    store = DataStore(work / "tokenize")
    names = [f"{DATASET}-{i}" for i in range(len(corpus["files"]))]
    for name, file in zip(names, corpus["files"], strict=True):
        store.import_path(corpus["directory"] / file, name, SPLIT)
    documents = {name: list(store.documents(name, SPLIT)) for name in names}
    infos: list[TokenizationInfo] = []
    counted: list[int] = []

    def store_tokenize(name: str) -> Callable[[], float]:
        def tokenize() -> float:
            started = time.perf_counter()
            infos.append(store.tokenized(name, SPLIT, tokenizer, shard_tokens))
            return time.perf_counter() - started

        return tokenize

    def encode_only(name: str) -> Callable[[], float]:
        def encode() -> float:
            started = time.perf_counter()
            tokens, texts = 0, documents[name]
            for start in range(0, len(texts), ENCODE_BATCH):
                for ids in tokenizer.encode_batch(texts[start : start + ENCODE_BATCH]):
                    tokens += len(ids) + 1  # the shards hold an end-of-text token after each
            counted.append(tokens)
            return time.perf_counter() - started

        return encode

    tokenizer.encode_batch(documents[names[0]][:ENCODE_BATCH])  # warm-up: thread pool, caches
    pairs = alternate([(store_tokenize(name), encode_only(name)) for name in names])
    infos.sort(key=lambda info: info.dataset)

    def read_back() -> None:
        for name in names:
            for _ in store.documents(name, SPLIT):
                pass

    read_back_s = timed(read_back)
    store.db.close()
    tokens = [info.tokens for info in infos]
    figures = paired_figures(pairs, tokens, "tokens_per_s")
    figures.update(
        slices=len(names),
        tokens=sum(tokens),
        tokens_match_baseline=sorted(counted) == sorted(tokens),
        documents=sum(info.documents for info in infos),
        shards=sum(len(info.shards) for info in infos),
        shard_tokens=shard_tokens,
        bytes_per_token=round(
            sum(len(d.encode("utf-8")) for texts in documents.values() for d in texts)
            / sum(tokens),
            3,
        ),
        # one part of the difference: reading the documents back from the zstd part files
        read_parts_back_s=round(read_back_s, 3),
    )
    return figures, infos


def measure_batches(infos: list[TokenizationInfo], batch_size: int, block_size: int, repeats: int):
    """SequentialBatches over each memmapped shard vs BatchSampler over all tokens in memory."""
    shards = [(shard, info.dtype) for info in infos for shard in info.shards]
    in_memory = np.concatenate([np.asarray(load_shard(s, dtype)[0]) for s, dtype in shards])
    counts: list[int] = []

    def sequential() -> float:
        started = time.perf_counter()
        batches = 0
        for shard, dtype in shards:
            tokens, mask = load_shard(shard, dtype)
            reader = SequentialBatches(tokens, batch_size, block_size, mask=mask)
            while reader.next() is not None:
                batches += 1
        counts.append(batches)
        return time.perf_counter() - started

    sequential()  # warm-up: page cache and allocator
    total = counts[0]

    def sampled() -> float:
        sampler = BatchSampler(in_memory, batch_size, block_size, seed=0)
        started = time.perf_counter()
        for _ in range(total):
            sampler.next()
        return time.perf_counter() - started

    pairs = alternate([(sequential, sampled)] * repeats)
    figures = paired_figures(pairs, [total] * repeats, "batches_per_s")
    figures.update(batches_per_pass=total, batch_size=batch_size, block_size=block_size)
    return figures


def measure_serving(infos: list[TokenizationInfo], repeats: int) -> dict:
    """Per shard: read + zstd compress (server), decompress + sha256 check (node), vs a read."""
    shards = [shard for info in infos for shard in info.shards]
    stages: dict[str, list[float]] = {"read": [], "compress": [], "decompress": [], "sha256": []}
    raw_total = wire_total = 0
    for repeat in range(repeats + 1):  # the first pass warms the page cache, not counted
        totals = dict.fromkeys(stages, 0.0)
        raw_total = wire_total = 0
        for shard in shards:
            t0 = time.perf_counter()
            raw = shard.path.read_bytes()
            t1 = time.perf_counter()
            body = encoding.compress(raw, "zstd")
            t2 = time.perf_counter()
            data = encoding.decompress(body, "zstd", max_output=len(raw))
            t3 = time.perf_counter()
            if hashlib.sha256(data).hexdigest() != shard.sha256:
                raise RuntimeError(f"shard {shard.path} does not match its sha256")
            t4 = time.perf_counter()
            for stage, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                totals[stage] += seconds
            raw_total += len(raw)
            wire_total += len(body)
        if repeat:
            for stage, seconds in totals.items():
                stages[stage].append(seconds)
    median = {stage: statistics.median(values) for stage, values in stages.items()}
    serve_s = sum(median.values())
    megabytes = raw_total / MB
    level3 = zstandard.ZstdCompressor(level=3)
    level3_total = sum(len(level3.compress(shard.path.read_bytes())) for shard in shards)
    return {
        "shard_mb": round(megabytes, 2),
        "serve_and_verify_mb_per_s": round(megabytes / serve_s, 1),
        "baseline_read_mb_per_s": round(megabytes / median["read"], 1),
        "ratio": ratio(median["read"], serve_s),
        "ms_per_mb": {stage: round(1000 * s / megabytes, 3) for stage, s in median.items()},
        "compression_ratio_zstd_level1": ratio(raw_total, wire_total),
        "compression_ratio_zstd_level3": ratio(raw_total, level3_total),
        "wire_mb": round(wire_total / MB, 2),
    }


# --------------------------------------------------------------------------- memory (RSS)


def _rss_child(corpus_dir: str, data_dir: str, mode: str) -> dict:
    """Runs in a fresh process: its peak RSS during one import, one plain read, or a read that
    keeps every document (the control: what not streaming would cost). The peak of start-up
    (importing torch) is cleared first where Linux allows it (clear_refs). For an import, also
    the peak before its final database transaction (DataStore._record, when it exists), i.e.
    while the documents stream."""
    options = ImportOptions()
    cleared = _clear_peak_rss()
    before_kib = _peak_rss_kib()
    streaming_kib: list[int] = []
    documents = 0
    if mode == "import":
        store = DataStore(Path(data_dir))
        record = getattr(store, "_record", None)
        if record is not None:  # a diagnostic only: the import runs the same without it

            def record_after_peak(*args, **kwargs):
                streaming_kib.append(_peak_rss_kib())
                return record(*args, **kwargs)

            store._record = record_after_peak  # type: ignore[method-assign]
        documents = store.import_path(corpus_dir, DATASET, SPLIT, options).documents
    elif mode == "read":
        documents = read_only(Path(corpus_dir), options)
    else:
        kept = [d for s in find_sources(corpus_dir, options) for d in read_documents(s, options)]
        documents = len(kept)
        del kept
    return {
        "documents": documents,
        "before_mb": round(before_kib / 1024, 1),
        "peak_mb": round(_peak_rss_kib() / 1024, 1),
        "peak_while_streaming_mb": round(streaming_kib[0] / 1024, 1) if streaming_kib else None,
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "start_up_peak_cleared": cleared,
    }


def _clear_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_kib() -> int:
    """VmHWM: the peak that getrusage's ru_maxrss reports, minus what threads that already
    exited left in it (a spawned child's start-up threads hold torch's import peak there,
    which clear_refs does not reset); ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_memory(work: Path, corpus: dict, seed: int) -> dict:
    """Peak RSS of fresh processes: import the corpus; a quarter of its bytes in as many files;
    the same quarter in MANY_FILES files; only read the corpus; read it keeping every document
    in a list (the control: what an import that did not stream would cost)."""
    quarter_mb = corpus["bytes"] / MB / 4
    small, _ = generate_corpus(work / "corpus-quarter", quarter_mb, seed + 1)
    many, _ = generate_corpus(work / "corpus-quarter-many", quarter_mb, seed + 1, MANY_FILES)
    runs = {
        "import_all": (corpus, "import"),
        "import_quarter": (small, "import"),
        f"import_quarter_in_{MANY_FILES}_files": (many, "import"),
        "read_all_baseline": (corpus, "read"),
        "keep_all_documents_control": (corpus, "keep"),
    }
    spawn = multiprocessing.get_context("spawn")
    results = {}
    for name, (source, mode) in runs.items():
        arguments = (str(source["directory"]), str(work / f"rss-{name}"), mode)
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            figures = pool.submit(_rss_child, *arguments).result()
        figures["source_files"] = len(source["files"])
        figures["corpus_mb"] = round(source["bytes"] / MB, 2)
        figures["growth_mb"] = round(figures["peak_mb"] - figures["before_mb"], 1)
        if figures["peak_while_streaming_mb"] is not None:
            streaming = figures["peak_while_streaming_mb"] - figures["before_mb"]
            figures["growth_while_streaming_mb"] = round(streaming, 1)
            extra = figures["peak_mb"] - figures["peak_while_streaming_mb"]
            figures["final_transaction_extra_mb"] = round(extra, 1)
            figures["final_transaction_kb_per_document"] = round(
                extra * 1024 / max(1, figures["documents"]), 2
            )
        figures["growth_vs_corpus"] = ratio(figures["growth_mb"], source["bytes"] / MB)
        results[name] = figures
        log(f"  {name}: peak {figures['peak_mb']} MB (growth {figures['growth_mb']} MB)")
    extra_files = MANY_FILES - FILES
    many_growth = results[f"import_quarter_in_{MANY_FILES}_files"]["growth_mb"]
    results["growth_per_extra_source_file_mb"] = round(
        (many_growth - results["import_quarter"]["growth_mb"]) / extra_files, 3
    )
    return results


# ---------------------------------------------------------------------------------------- run


def environment() -> dict:
    return {
        **machine(),
        "torch_threads": torch.get_num_threads(),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "(unset: on)"),
        "rayon_num_threads": os.environ.get("RAYON_NUM_THREADS", "(unset: all cores)"),
        "zstandard": zstandard.__version__,
    }


def run(args: argparse.Namespace) -> dict:
    work = WorkDir(args.keep)
    started = time.perf_counter()
    try:
        log(f"generating a {args.mb:g} MB corpus ...")
        corpus, documents = generate_corpus(work.path / "corpus", args.mb, args.seed)
        log(f"  {corpus['documents']:,} documents in {len(corpus['files'])} files")
        log(f"training a {args.vocab_size}-token BPE on {args.tokenizer_sample_mb:g} MB ...")
        tokenizer = Tokenizer.train(
            tokenizer_sample(documents, args.tokenizer_sample_mb), args.vocab_size
        )
        del documents
        log("1/5 import vs importers alone ...")
        imported = measure_import(work.path, corpus, args.repeats)
        log(f"  ratio {imported['ratio']}")
        log(f"2/5 tokenization into shards vs encode_batch, {len(corpus['files'])} slices ...")
        tokenized, infos = measure_tokenization(work.path, corpus, tokenizer, args.shard_tokens)
        log(f"  ratio {tokenized['ratio']}")
        log("3/5 SequentialBatches over memmapped shards vs BatchSampler in memory ...")
        batches = measure_batches(infos, args.batch_size, args.block_size, args.repeats)
        log(f"  ratio {batches['ratio']}")
        log("4/5 shard serving: compress + decompress + sha256 vs a plain read ...")
        serving = measure_serving(infos, args.repeats)
        log(f"  ratio {serving['ratio']}")
        log("5/5 peak RSS of the import, in fresh processes ...")
        memory = measure_memory(work.path, corpus, args.seed)
    finally:
        work.cleanup()
    corpus["directory"] = "(temporary)"
    corpus["mb"] = round(corpus["bytes"] / MB, 2)
    return {
        "benchmark": "data_pipeline",
        "environment": environment(),
        "settings": {
            "quick": args.quick,
            "repeats": args.repeats,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer_sample_mb": args.tokenizer_sample_mb,
            "shard_tokens": args.shard_tokens,
            "encode_batch_documents": ENCODE_BATCH,
            "seed": args.seed,
        },
        "corpus": corpus,
        "import": imported,
        "tokenization": tokenized,
        "node_batches": batches,
        "shard_serving": serving,
        "import_peak_rss": memory,
        "ratio": {
            "import_vs_read": imported["ratio"],
            "tokenized_vs_encode_batch": tokenized["ratio"],
            "sequential_batches_vs_batch_sampler": batches["ratio"],
            "shard_serving_vs_read": serving["ratio"],
            "import_rss_growth_vs_corpus": memory["import_all"]["growth_vs_corpus"],
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
