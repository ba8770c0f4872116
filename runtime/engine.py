"""The model worker behind `edgellm serve`: one request at a time (batch 1) from a bounded FIFO queue.

One thread owns the Generator (the model's KV cache is one conversation's state, so requests
cannot interleave). Requests wait in a deque in arrival order; when `max_queue` are already
waiting a new one is refused (`QueueFull`, with a wait estimate for Retry-After) instead of piling
up. Each job streams its text pieces to its asyncio consumer through `loop.call_soon_threadsafe`;
a consumer that goes away sets `cancel`, and the worker stops that generation at its next piece
(or drops it unstarted), so the next request starts at once.

Prefix reuse: consecutive requests share the model's cache. A chat that continues (its prompt
extends the previous prompt + reply) only prefills its new tokens; any other request reuses
whatever leading tokens it has in common (e.g. the same system prompt).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field

from .errors import EdgeLLMError
from .generate import Generator, Sampling
from .logprobs import entry, prompt_entries

log = logging.getLogger("edgellm.serve")


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting, self.retry_after = waiting, retry_after


@dataclass
class Result:
    """How a job ended. `prompt_tokens` counts the whole prompt, `cached_tokens` the part reused."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    stop_reason: str = ""  # eos | stop | length | cancelled | error
    queued_s: float = 0.0
    ttft_s: float = 0.0  # from the start of its turn on the model to its first text piece
    gen_s: float = 0.0
    error: Exception | None = None

    @property
    def tokens_per_s(self) -> float:
        return (self.completion_tokens - 1) / self.gen_s if self.gen_s > 0 and self.completion_tokens > 1 else 0.0


@dataclass
class Job:
    id: str
    ids: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    # ("piece", str) ... then ("done", Result); with logprobs, ("logprobs", [TokenLogprob]) before
    # each piece (the tokens decoded since the last piece), and ("prompt", ...) first with echo
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    wall: float = field(default_factory=time.time)  # the response's `created`
    note: str = ""  # extra text for the log line (the prompt, with --log-prompts)
    logprobs: int | None = None  # report each token's logprob and this many alternatives (None: off)
    echo: bool = False  # score the prompt first: a ("prompt", [TokenLogprob | None]) event

    def put(self, kind: str, value):
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Engine:
    """Runs jobs one at a time, first come first served, on `gen`."""

    def __init__(self, gen: Generator, max_queue: int = 16, reuse_prefix: bool = True):
        if max_queue < 0:
            raise EdgeLLMError(f"--max-queue {max_queue} is invalid; give 0 or more")
        self.gen, self.max_queue, self.reuse_prefix = gen, max_queue, reuse_prefix
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running: Job | None = None
        self._closed = False
        self._mean_s = 1.0  # running mean of a request's time on the model, for Retry-After
        self.served = 0
        self._thread = threading.Thread(target=self._work, name="edgellm-model", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- called from the event loop
    def submit(self, job: Job):
        """Queue `job`, or raise QueueFull when `max_queue` jobs already wait."""
        with self._cv:
            if self._closed:
                raise EdgeLLMError("the server is shutting down")
            ahead = len(self._waiting) + (self._running is not None)
            if ahead > self.max_queue:  # one runs, max_queue wait
                raise QueueFull(len(self._waiting), max(1, math.ceil(ahead * self._mean_s)))
            self._waiting.append(job)
            self._cv.notify()

    def abandon(self, job: Job):
        """The client went away: drop the job if it still waits, else stop it at its next piece (the
        slot engine: free its slot at the next step)."""
        job.cancel.set()
        with self._cv:
            try:
                self._waiting.remove(job)
            except ValueError:
                return
        job.put("done", Result(prompt_tokens=len(job.ids), stop_reason="cancelled"))

    def load(self) -> dict:
        with self._cv:
            return {
                "running": int(self._running is not None),
                "waiting": len(self._waiting),
                "max_queue": self.max_queue,
            }

    def close(self, timeout: float | None = None):
        """Finish what runs and what waits, then stop the worker."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # -------------------------------------------------------------- the worker thread
    def _work(self):
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if not self._waiting:
                    return
                job = self._running = self._waiting.popleft()
            try:
                result = self._run(job)
            finally:
                with self._cv:
                    self._running = None
            self.served += 1
            job.put("done", result)
            log.info(_line(job, result))

    def _run(self, job: Job) -> Result:
        t0 = time.perf_counter()
        res = Result(prompt_tokens=len(job.ids), queued_s=t0 - job.submitted)
        if job.cancel.is_set():
            res.stop_reason = "cancelled"
            return res
        gen = self.gen
        gen.stats = type(gen.stats)()  # no stale figures if the generation fails before it starts
        first = None
        pending: list = []
        observe = None if job.logprobs is None else lambda tok, logits: pending.append(entry(tok, logits, job.logprobs))
        pieces = None
        try:
            if job.echo:  # the prompt's own logprobs (lm-evaluation-harness's loglikelihood requests)
                job.put("prompt", prompt_entries(job.ids, gen.score(job.ids), job.logprobs or 0))
            if job.sampling.max_new_tokens == 0:
                res.stop_reason = "length"
            else:
                pieces = gen.stream(job.ids, job.sampling, reuse_prefix=self.reuse_prefix or job.echo, observe=observe)
                for piece in pieces:
                    if first is None:
                        first = time.perf_counter()
                    if job.cancel.is_set():
                        res.stop_reason = "cancelled"
                        break
                    if observe is not None:
                        job.put("logprobs", pending[:])
                        pending.clear()
                    job.put("piece", piece)
                else:
                    res.stop_reason = gen.stats.stop_reason
                    if pending:  # the end-of-sequence token, or tokens whose text a stop string cut
                        job.put("logprobs", pending[:])
        except Exception as exc:  # noqa: BLE001 - reported to the client as a 500, logged here
            res.stop_reason, res.error = "error", exc
        finally:
            if pieces is not None:
                pieces.close()
        end = time.perf_counter()
        st = gen.stats
        res.cached_tokens = len(job.ids) - st.prompt_tokens if st.prompt_tokens and not job.echo else 0
        res.completion_tokens = st.gen_tokens - (st.stop_reason == "eos")
        res.ttft_s = (first or end) - t0
        res.gen_s = end - first if first else 0.0
        self._mean_s += ((end - t0) - self._mean_s) / min(self.served + 1, 20)
        return res


def _line(job: Job, r: Result) -> str:
    """One log line per request: no prompt text unless the server was asked to log it."""
    line = (
        f"{job.id} {r.stop_reason} prompt={r.prompt_tokens} (cached {r.cached_tokens}) "
        f"completion={r.completion_tokens} queued={r.queued_s:.3f}s ttft={r.ttft_s:.3f}s {r.tokens_per_s:.1f} tokens/s"
    )
    if r.error is not None:
        line += f" error={type(r.error).__name__}: {r.error}"
    return line + (f" {job.note}" if job.note else "")
