"""Chat inference off the coordinator's path: worker threads with their own model copies.

- At most `max_chat_streams` generations run at once (more are refused with 429), each on a
  worker thread of its own pool that uses THREADS_PER_STREAM torch threads. Only those threads
  are limited: torch's intra-op thread count is per thread, so training keeps its cores.
- The current model is a copy taken from the coordinator's snapshot when a chat starts and the
  version moved, at most every REFRESH_S seconds; kept checkpoints and imported bundles are
  loaded on first use and kept in a small LRU.
- A client that goes away stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import anyio
import torch

from crowdtrain.data.chat import ROLES, ChatTemplate, render
from crowdtrain.model.generate import generate
from crowdtrain.model.tokenizer import Tokenizer
from crowdtrain.protocol.errors import WireError
from crowdtrain.server.library import LoadedModel, ModelLibrary

log = logging.getLogger(__name__)

THREADS_PER_STREAM = 1  # torch intra-op threads of each generation
REFRESH_S = 5.0  # the current model is copied from the coordinator at most this often
CACHED_MODELS = 2  # checkpoints and imported models kept loaded, least recently used out
BUSY_RETRY_S = 2.0
MAX_PENDING_TOKENS = 8  # tokens held back to complete a character (at most 4 bytes)


@dataclass(frozen=True)
class Sampling:
    """How to sample a reply (crowdtrain.model.generate)."""

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int = 256


class InferenceService:
    """Generations for the chat API; owned by the runtime, stopped with it."""

    def __init__(self, library: ModelLibrary, max_streams: int, threads: int = THREADS_PER_STREAM):
        self.library = library
        self.max_streams = max_streams
        self._executor = ThreadPoolExecutor(
            max_workers=max_streams,
            thread_name_prefix="chat",
            initializer=_limit_torch_threads,
            initargs=(threads,),
        )
        self._lock = threading.Lock()
        self._active: set[ChatStream] = set()
        self._admitted = 0
        self._closed = False
        self._current: LoadedModel | None = None
        self._current_at = 0.0
        self._current_lock = threading.Lock()
        self._cache: OrderedDict[str, LoadedModel] = OrderedDict()
        self._load_lock = threading.Lock()

    async def open(
        self, model_id: str, messages: Sequence[Mapping[str, str]], sampling: Sampling
    ) -> ChatStream:
        """Start a generation; its events come from the stream. 429 when `max_streams` run
        already, 404 for an unknown model. The generation runs to its end (or until the
        stream's reader goes away), and holds its place until then."""
        self._admit()
        stream = ChatStream(asyncio.get_running_loop())
        try:
            loaded = await anyio.to_thread.run_sync(self.model, model_id)
            prompt = prompt_ids(messages, loaded.tokenizer, loaded.chat_template)
            with self._lock:
                if self._closed:
                    raise WireError(503, "stopping", "the server is stopping", retry_after_s=5)
                self._active.add(stream)
                self._executor.submit(self._run, loaded, prompt, sampling, stream)
        except BaseException:
            self._release(stream)
            raise
        return stream

    def model(self, model_id: str) -> LoadedModel:
        """The loaded model of `model_id` (blocking: it may load one)."""
        if model_id == "current":
            return self._current_model()
        key = self.library.cache_key(model_id)
        with self._load_lock:  # one load at a time: two chats of a new model load it once
            with self._lock:
                found = self._cache.get(key)
                if found is not None:
                    self._cache.move_to_end(key)
                    return found
            loaded = self.library.load(model_id)
            with self._lock:
                self._cache[key] = loaded
                while len(self._cache) > CACHED_MODELS:
                    self._cache.popitem(last=False)
            return loaded

    def forget(self, model_id: str) -> None:
        """Drop a removed model from the cache (a chat that has it finishes with it)."""
        with self._lock:
            for key in [k for k in self._cache if k.split("@", 1)[0] == model_id]:
                del self._cache[key]

    @property
    def active(self) -> int:
        return self._admitted

    def stop(self) -> None:
        """End every generation at its next token and wait for the workers."""
        with self._lock:
            self._closed = True
            streams = list(self._active)
        for stream in streams:
            stream.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ---- internals ----

    def _admit(self) -> None:
        with self._lock:
            if self._closed:
                raise WireError(503, "stopping", "the server is stopping", retry_after_s=5)
            if self._admitted >= self.max_streams:
                raise WireError(
                    429,
                    "too_many_chats",
                    f"{self._admitted} chat replies are being generated, the most this server "
                    f"runs at once (max_chat_streams = {self.max_streams}); retry in a moment",
                    retry_after_s=BUSY_RETRY_S,
                )
            self._admitted += 1

    def _release(self, stream: ChatStream) -> None:
        with self._lock:
            self._admitted -= 1
            self._active.discard(stream)

    def _current_model(self) -> LoadedModel:
        coordinator = self.library.runtime.coordinator
        with self._current_lock:
            current, now = self._current, time.monotonic()
            stale = current is None or (
                current.version != coordinator.version and now - self._current_at >= REFRESH_S
            )
            if stale:
                # a new object: chats still running keep the copy they started with
                self._current = current = self.library.load("current")
                self._current_at = now
            assert current is not None
            return current

    def _run(
        self, loaded: LoadedModel, prompt: list[int], sampling: Sampling, stream: ChatStream
    ) -> None:
        """One generation, on a worker thread: text events, then done (or an error)."""
        started = time.monotonic()
        text = TextStream(loaded.tokenizer, loaded.chat_template)
        count, finish = 0, "length"
        try:
            tokens = generate(
                loaded.model,
                prompt,
                sampling.max_tokens,
                sampling.temperature,
                sampling.top_k,
                sampling.top_p,
                eot_id=loaded.tokenizer.eot_id,
            )
            for token in tokens:
                if stream.cancelled:
                    finish = "cancelled"
                    break
                count += 1
                stream.send({"text": text.add(token)})
                if text.stopped:
                    finish = "stop"
                    break
            else:
                finish = "length" if count == sampling.max_tokens else "stop"
            stream.send({"text": text.flush()})
            seconds = round(time.monotonic() - started, 3)
            stream.send(
                {
                    "done": True,
                    "tokens": count,
                    "seconds": seconds,
                    "model": loaded.id,
                    "version": loaded.version,
                    "finish": finish,
                }
            )
        except Exception as error:  # a bug or out of memory: the reader learns it, the log too
            log.exception("a chat reply from %s failed", loaded.id)
            stream.send({"error": "generation_failed", "detail": f"the reply failed: {error}"})
        finally:
            stream.close()
            self._release(stream)


class ChatStream:
    """The events of one generation, passed from its worker thread to the response."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def send(self, event: dict[str, Any]) -> None:
        """From the worker: queue an event (an empty text piece is left out)."""
        if event.get("text") == "":
            return
        self._put(event)

    def close(self) -> None:
        self._put(None)

    def _put(self, event: dict[str, Any] | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is reading
            self.cancel()

    async def events(self) -> AsyncIterator[bytes]:
        """Server-sent events, one `data: JSON` each. Leaving early (the client went away)
        stops the generation."""
        try:
            while (event := await self._queue.get()) is not None:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
        finally:
            self.cancel()


class TextStream:
    """Decoded text of generated tokens, piece by piece. A character split over tokens comes
    out whole, and the text ends before the model starts another turn (a role header, with the
    end_of_turn before it)."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate):
        self._tokenizer = tokenizer
        headers = [template.header(role) for role in ROLES]
        self._stops = [template.end_of_turn + h for h in headers if template.end_of_turn]
        self._stops += headers
        self._pending: list[int] = []
        self._held = ""  # text that may be the start of a stop text
        self.stopped = False

    def add(self, token: int) -> str:
        """The text that is now certain, given one more token."""
        if self.stopped:
            return ""
        self._pending.append(token)
        text = self._tokenizer.decode(self._pending)
        if text.endswith("\ufffd") and len(self._pending) < MAX_PENDING_TOKENS:
            return ""  # the bytes of a character so far: wait for the rest
        self._pending = []
        return self._release(text)

    def flush(self) -> str:
        """The rest, at the end of the generation."""
        if self.stopped:
            return ""
        out = self._release(self._tokenizer.decode(self._pending)) if self._pending else ""
        if not self.stopped:
            out += self._held
        self._pending, self._held = [], ""
        return out

    def _release(self, text: str) -> str:
        text = self._held + text
        found = [index for stop in self._stops if (index := text.find(stop)) >= 0]
        if found:
            self.stopped, self._held = True, ""
            return text[: min(found)]
        keep = max((_overlap(text, stop) for stop in self._stops), default=0)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a beginning of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0


def prompt_ids(
    messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer, template: ChatTemplate
) -> list[int]:
    """The tokens to generate a reply from: a document start (eot), the conversation tokenized
    as in training (crowdtrain.data.chat.render), then the assistant's header."""
    ids, _ = render(messages, tokenizer, template)
    conversation = [int(token) for token in ids[:-1]]  # render ends it with eot
    return [tokenizer.eot_id, *conversation, *tokenizer.encode(template.assistant)]


def _limit_torch_threads(threads: int) -> None:
    """Run this thread's torch ops on `threads` threads, and leave the default that threads
    started later get as it was: torch.set_num_threads sets both, from a new thread only the
    default."""
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    restore = threading.Thread(target=torch.set_num_threads, args=(default,), name="chat-setup")
    restore.start()
    restore.join()
