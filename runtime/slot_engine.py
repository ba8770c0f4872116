"""The model worker behind `edgellm serve --parallel N`: N requests decoded together (continuous batching).

One thread owns the model. Each running request holds a slot: its own KV cache (batched.py
`SlotCaches`). Every step is one compiled call (`forward_rows`) over a token of every slot that is
generating plus a chunk of at most PREFILL_CHUNK prompt tokens of the slots still reading their
prompts, so the weights are read once for all of them, a new request joins at the next step, and a
long prompt stalls the running streams for one chunk at a time, never for the whole prompt (with
no stream running, prompts are read in the single-sequence forward's larger chunks).

Between steps the worker admits waiting requests into free slots, drops requests whose client went
away (`abandon` sets `cancel`: the slot is free at the next step), and samples each slot's token
from its row of logits (`pick`, the one place a request's grammar (runtime/constrain.py) masks them). The
queue, the events sent to the HTTP side and the log line are those of the one-at-a-time Engine
(engine.py), so serve.py drives either.

Prefix reuse per slot: a slot keeps the tokens of its last request in its cache; a new request
goes to the free slot whose cached tokens share the longest prefix with its prompt (a continuing
chat, a common system prompt) and reads only the rest. A longer prefix in a busy slot's cache is
copied into the free slot first.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .batched import PREFILL_CHUNK, SlotCaches
from .engine import Engine, Job, QueueFull, Result, _line
from .errors import EdgeLLMError
from .generate import _DAMAGED, Generator, _numeric_damage, sample
from .logprobs import entry, prompt_entries
from .model import PROMPT_CHUNK
from .textout import TextOut

log = logging.getLogger("edgellm.serve")


@dataclass
class _Run:
    """One request in its slot."""

    job: Job
    slot: int
    res: Result
    text: TextOut
    rng: np.random.Generator
    budget: int  # tokens it may generate
    fed: int  # prompt tokens in the slot's cache
    t0: float
    context: list = field(default_factory=list)  # prompt + generated tokens (repetition penalty)
    last: int = -1  # the sampled token the next step feeds
    first: float | None = None  # when its first token was sampled
    gen_tokens: int = 0
    pending: list = field(default_factory=list)  # logprobs of the tokens behind the next piece
    con: object = None  # constrain.Constraint of a structured-output request


def pick(run: _Run, logits: np.ndarray) -> int:
    """The slot's next token from its row of logits (V,)."""
    p = run.job.sampling
    seen = np.array(run.context, np.int64) if p.repetition_penalty != 1.0 else None
    if run.con is not None:  # disallowed tokens -> -inf (on a copy: logprobs read the raw logits)
        logits = logits.copy()
        run.con.mask(logits)
    return sample(logits, p, run.rng, seen)


class SlotEngine:
    """Runs up to `parallel` jobs at once on `gen` (a numba CPU model), the rest wait first come first served."""

    def __init__(
        self,
        gen: Generator,
        parallel: int,
        max_queue: int = 16,
        reuse_prefix: bool = True,
        chunk: int = PREFILL_CHUNK,
    ):
        if max_queue < 0:
            raise EdgeLLMError(f"--max-queue {max_queue} is invalid; give 0 or more")
        if getattr(gen.model, "backend", None) != "numba" or not hasattr(gen.model, "weights"):
            raise EdgeLLMError("--parallel above 1 runs on the numba backend (CPU); give --backend numba")
        if chunk < 1:
            raise EdgeLLMError(f"prompt chunk {chunk} is invalid; give 1 or more")
        self.gen, self.max_queue, self.reuse_prefix, self.chunk = gen, max_queue, reuse_prefix, chunk
        self.parallel = parallel
        self.slots = SlotCaches(gen.model, parallel)
        self.slots.warmup()
        self.cached: list[list[int]] = [[] for _ in range(parallel)]  # tokens in each slot's cache
        self._free = list(range(parallel))
        self._active: list[_Run] = []
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._mean_s = 1.0  # running mean of a request's time in its slot, for Retry-After
        self.served = 0
        self.steps = 0
        self._thread = threading.Thread(target=self._work, name="edgellm-slots", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- called from the event loop
    def submit(self, job: Job):
        """Queue `job`, or raise QueueFull when `max_queue` jobs already wait for a slot."""
        with self._cv:
            if self._closed:
                raise EdgeLLMError("the server is shutting down")
            free = self.parallel - len(self._active)
            if len(self._waiting) >= self.max_queue + max(0, free):
                ahead = len(self._waiting) + len(self._active)
                raise QueueFull(len(self._waiting), max(1, math.ceil(ahead / self.parallel * self._mean_s)))
            self._waiting.append(job)
            self._cv.notify()

    # The client went away: drop the job if it still waits, else its slot is freed at the next step
    # (the step loop reads job.cancel). Same queue fields as Engine's.
    abandon = Engine.abandon

    def load(self) -> dict:
        with self._cv:
            return {
                "running": len(self._active),
                "waiting": len(self._waiting),
                "max_queue": self.max_queue,
                "slots": self.parallel,
            }

    def close(self, timeout: float | None = None):
        """Finish what runs and what waits (SIGTERM drains every slot), then stop the worker."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # -------------------------------------------------------------- the worker thread
    def _work(self):
        while True:
            with self._cv:
                while not self._waiting and not self._active and not self._closed:
                    self._cv.wait()
                if not self._waiting and not self._active:
                    return
                admit = []
                while self._waiting and len(self._free) > len(admit):
                    admit.append(self._waiting.popleft())
            for job in admit:
                self._start(job)
            if self._active:
                self._step()

    def _shared(self, s: int, ids: list[int]) -> int:
        """Leading tokens of `ids` that slot s holds in its cache, at most len(ids) - 1 (the last
        prompt token is always run, for its logits)."""
        c, cached = 0, self.cached[s]
        lim = min(len(cached), len(ids) - 1)
        while c < lim and cached[c] == ids[c]:
            c += 1
        return c

    def _slot_for(self, ids: list[int]) -> tuple[int, int]:
        """(free slot, cached tokens it holds of `ids`' prefix). The free slot sharing the longest
        prefix with `ids`; when a busy slot shares a longer one (several clients sending the same
        long instructions), its keys and values are copied over (slots are pages of one array: a
        copy of a few MB instead of reading the prompt again)."""
        best, common = self._free[0], 0
        if not self.reuse_prefix:
            return best, common
        for s in self._free:
            c = self._shared(s, ids)
            if c > common:
                best, common = s, c
        src, more = best, common
        for s in range(self.parallel):
            c = self._shared(s, ids)
            if c > more:
                src, more = s, c
        if src != best:
            self.slots.copy_prefix(src, best, more)
            self.cached[best] = self.cached[src][:more]
            common = more
        return best, common

    def _start(self, job: Job):
        t0 = time.perf_counter()
        res = Result(prompt_tokens=len(job.ids), queued_s=t0 - job.submitted)
        if job.cancel.is_set():
            return self._done(job, res, "cancelled")
        n_ctx = self.gen.model.n_ctx
        try:
            job.sampling.check()
            if not job.ids or len(job.ids) + 1 > n_ctx:
                raise EdgeLLMError(f"the prompt has {len(job.ids)} tokens; the context holds {n_ctx}")
            if job.echo:  # the prompt's own logprobs, on the model's own cache
                job.put("prompt", prompt_entries(job.ids, self.gen.score(job.ids), job.logprobs or 0))
            con = job.sampling.grammar.start() if job.sampling.grammar is not None else None
        except Exception as exc:  # noqa: BLE001 - reported to the client as a 500, logged here
            return self._done(job, res, "error", exc)
        if job.sampling.max_new_tokens == 0:
            return self._done(job, res, "length")
        slot, common = self._slot_for(job.ids)
        self._free.remove(slot)
        self.slots.truncate(slot, common)
        del self.cached[slot][common:]
        res.cached_tokens = 0 if job.echo else common
        run = _Run(
            job=job,
            slot=slot,
            res=res,
            text=TextOut(self.gen.tokenizer, job.sampling.stop, job.sampling.keep_special),
            rng=np.random.default_rng(job.sampling.seed),
            budget=min(job.sampling.max_new_tokens, n_ctx - len(job.ids)),
            fed=common,
            t0=t0,
            context=list(job.ids),
            con=con,
        )
        with self._cv:
            self._active.append(run)

    def _step(self):
        """One batched forward over every active slot; then each slot's token."""
        segments, runs = [], []
        # prompt tokens left in this step: `chunk` while some slot streams (it waits for the step),
        # the single-sequence forward's chunk when none does (nobody to keep waiting)
        decoding = any(r.fed >= len(r.job.ids) for r in self._active)
        room = self.chunk if decoding else max(self.chunk, PROMPT_CHUNK)
        for run in list(self._active):
            if run.job.cancel.is_set():
                self._finish(run, "cancelled")
                continue
            ids = run.job.ids
            if run.fed < len(ids):  # still reading its prompt
                if room <= 0:
                    continue
                n = min(room, len(ids) - run.fed)
                room -= n
                segments.append((run.slot, ids[run.fed : run.fed + n], run.fed + n == len(ids), True))
            else:
                segments.append((run.slot, [run.last], True, False))
            runs.append(run)
        if not segments:
            return
        try:
            with _numeric_damage():
                logits = self.slots.step([(s, np.asarray(t, np.int64), w, p) for s, t, w, p in segments])
        except Exception as exc:  # noqa: BLE001 - every request in the step fails as a 500
            for run in runs:
                self._finish(run, "error", exc)
            return
        self.steps += 1
        k = 0
        for run, (s, toks, wants, _) in zip(runs, segments):
            self.cached[s].extend(int(t) for t in toks)
            if run.fed < len(run.job.ids):
                run.fed += len(toks)
            if wants:
                self._advance(run, logits[k])
                k += 1

    def _advance(self, run: _Run, logits: np.ndarray):
        """Sample the slot's token from its logits, hand out its text, end the run if it is done."""
        job = run.job
        if not np.isfinite(logits).all():
            return self._finish(run, "error", EdgeLLMError(_DAMAGED))
        try:
            tok = pick(run, logits)
        except EdgeLLMError as exc:  # a grammar that allows no token (runtime/constrain.py)
            return self._finish(run, "error", exc)
        if run.first is None:
            run.first = time.perf_counter()
        run.gen_tokens += 1
        if job.logprobs is not None:
            run.pending.append(entry(tok, logits, job.logprobs))
        if tok in self.gen.eos_ids and (not job.sampling.ignore_eos or run.con is not None):
            return self._finish(run, "eos")
        if run.con is not None:
            run.con.advance(tok)
        run.context.append(tok)
        piece, stopped = run.text.add(tok)
        complete = run.con is not None and run.con.done  # the grammar admits nothing more: as end of sequence
        if not stopped and (len(run.text.out) >= run.budget or complete):
            piece += run.text.rest()
        if piece:
            self._piece(run, piece)
        if stopped:
            return self._finish(run, "stop")
        if complete:
            return self._finish(run, "eos")
        if len(run.text.out) >= run.budget:
            return self._finish(run, "length")
        run.last = tok

    def _piece(self, run: _Run, piece: str):
        if run.job.logprobs is not None:
            run.job.put("logprobs", run.pending[:])
            run.pending.clear()
        run.job.put("piece", piece)

    def _finish(self, run: _Run, reason: str, error: Exception | None = None):
        """End `run`: its slot is free for the next request, its cache kept for prefix reuse."""
        if run.pending and reason in ("eos", "stop", "length"):
            run.job.put("logprobs", run.pending[:])
        res, end = run.res, time.perf_counter()
        res.completion_tokens = run.gen_tokens - (reason == "eos")
        res.ttft_s = (run.first or end) - run.t0
        res.gen_s = end - run.first if run.first else 0.0
        if error is not None:  # what the failed step left in the cache is unknown
            self.slots.truncate(run.slot, 0)
            self.cached[run.slot].clear()
        with self._cv:
            self._active.remove(run)
            self._free.append(run.slot)
        self._mean_s += ((end - run.t0) - self._mean_s) / min(self.served + 1, 20)
        self._done(run.job, res, reason, error)

    def _done(self, job: Job, res: Result, reason: str, error: Exception | None = None):
        res.stop_reason, res.error = reason, error
        self.served += 1
        job.put("done", res)
        log.info(_line(job, res))
