"""Text in, text out: tokenizer, chat template, sampling, stop strings, streaming.

gen = load("q4-onnx/")                                  # load once
for piece in gen.stream("Once upon a time", Sampling(temperature=0.7, seed=1)):
    print(piece, end="")                                # generate many
gen.stats                                               # tokens and seconds of the last call
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import EdgeLLMError


@dataclass
class Sampling:
    temperature: float = 0.7  # 0 = greedy (argmax)
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1 = off
    repetition_penalty: float = 1.0  # HF style: >1 discourages tokens already in the context
    seed: int | None = None  # same seed, same prompt -> same text
    max_new_tokens: int = 128
    stop: tuple = ()  # strings that end the generation (not included in the output)
    ignore_eos: bool = (
        False  # keep generating past end-of-sequence tokens (exactly max_new_tokens, as llama.cpp's --ignore-eos)
    )
    grammar: object = None  # constrain.Grammar: only tokens it allows are sampled (structured output)
    keep_special: tuple = ()  # special token ids whose text stays in the output (tool-call markers)

    def check(self):
        fin = math.isfinite
        for name, ok, want in (
            ("temperature", fin(self.temperature) and self.temperature >= 0, "a finite number >= 0"),
            ("top-k", self.top_k >= 0, "an integer >= 0"),
            ("top-p", fin(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("repetition-penalty", fin(self.repetition_penalty) and self.repetition_penalty > 0, "a finite number > 0"),
            ("max-new-tokens", self.max_new_tokens >= 1, "an integer >= 1"),
            ("seed", self.seed is None or 0 <= self.seed < 1 << 63, "an integer in [0, 2**63)"),
        ):
            if not ok:
                raise EdgeLLMError(f"--{name} {getattr(self, name.replace('-', '_'))} is out of range; give {want}")


def sample(logits: np.ndarray, p: Sampling, rng: np.random.Generator, seen: np.ndarray | None = None) -> int:
    """One token id from logits (V,) under `p`; `seen` are the ids the repetition penalty applies to.

    Per decode step this runs beside the model, so it touches the V logits only in a partition
    and one comparison: only the top-k candidates (and any tied with the k-th) are converted,
    sorted and exponentiated. Sorting all of SmolLM2's 49,152 logits in float64 cost 1.2 ms per
    token, a quarter of a decode step. The tokens left out have probability 0 either way, so the
    same seed draws the same token as a full sort would (ties now sort by token id)."""
    x = logits
    if p.repetition_penalty != 1.0 and seen is not None and seen.size:
        x = logits.astype(np.float64)
        ids = np.unique(seen)
        v = x[ids]
        x[ids] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if p.temperature == 0:
        return int(np.argmax(x))
    cand = np.flatnonzero(x >= np.partition(x, -p.top_k)[-p.top_k]) if 0 < p.top_k < x.size else None
    z = (x if cand is None else x[cand]).astype(np.float64) / p.temperature
    order = np.argsort(-z) if cand is None else np.argsort(-z, kind="stable")
    probs = np.exp(z[order] - z[order[0]])
    probs /= probs.sum()
    if p.top_p < 1.0:
        keep = np.searchsorted(np.cumsum(probs), p.top_p) + 1  # smallest prefix with mass >= top_p
        probs = probs[:keep] / probs[:keep].sum()
    pick = order[rng.choice(probs.size, p=probs)]
    return int(pick if cand is None else cand[pick])


class Tokenizer:
    """tokenizer.json via `tokenizers`, plus the chat template and special tokens of the export."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        self.path = path / "tokenizer.json"
        if not self.path.is_file():
            raise EdgeLLMError(f"'{path}' has no tokenizer.json; export the model with its tokenizer")
        self.tok = _tokenizers(lambda: HFTokenizer.from_file(str(self.path)), f"cannot read '{self.path}'")
        cfg = _read_json(path / "tokenizer_config.json")
        self.chat_template = cfg.get("chat_template")
        if self.chat_template is None and (path / "chat_template.jinja").is_file():
            self.chat_template = _read_text(path / "chat_template.jinja")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise EdgeLLMError(
                f"'{path / 'tokenizer_config.json'}' has a chat_template that is a JSON "
                f"{type(self.chat_template).__name__}; expected a string"
            )
        self.bos_token = _token_text(cfg.get("bos_token"), path / "tokenizer_config.json", "bos_token")
        self.eos_token = _token_text(cfg.get("eos_token"), path / "tokenizer_config.json", "eos_token")

    def encode(self, text: str, special: bool = True) -> list[int]:
        return _tokenizers(
            lambda: self.tok.encode(text, add_special_tokens=special).ids, f"'{self.path}' cannot encode the prompt"
        )

    def decode(self, ids, keep: tuple = ()) -> str:
        """Text of `ids` without special tokens, except those in `keep` (kept as their text)."""
        ids = list(ids)
        if keep and any(t in keep for t in ids):
            parts, run = [], []
            for t in ids + [None]:
                if t is None or t in keep:
                    parts.append(self.decode(run))
                    run = []
                    if t is not None:
                        parts.append(self.tok.id_to_token(t) or "")
                else:
                    run.append(t)
            return "".join(parts)
        return _tokenizers(
            lambda: self.tok.decode(ids, skip_special_tokens=True), f"'{self.path}' cannot decode the output"
        )

    def token_id(self, text: str | None):
        return (
            None
            if text is None
            else _tokenizers(lambda: self.tok.token_to_id(text), f"'{self.path}' cannot look up {text!r}")
        )

    def apply_chat_template(self, messages: list[dict], tools: list | None = None, **options) -> str:
        """The conversation as the model's template renders it, ending with the assistant's turn;
        `tools` for templates that read them (runtime/tools.py); `options` are the template's own
        variables (Qwen3: enable_thinking=False), as transformers' apply_chat_template(..., **kwargs)
        passes them."""
        if not self.chat_template:
            raise EdgeLLMError(
                "this model has no chat template (tokenizer_config.json 'chat_template'); use -p without --chat"
            )
        from .deps import require

        ImmutableSandboxedEnvironment = require(
            "jinja2.sandbox", "the chat template (--chat)"
        ).ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise EdgeLLMError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama 3.x, SmolLM3 (as HF)
        try:
            text = env.from_string(self.chat_template).render(
                **options,
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **({"tools": tools} if tools else {}),
            )
        except EdgeLLMError:
            raise
        except Exception as exc:  # jinja2's TemplateError, or a template that misuses a value
            raise EdgeLLMError(
                f"the model's chat template fails: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
        if not isinstance(text, str):
            raise EdgeLLMError("the model's chat template does not render to text")
        return text


def _tokenizers(call, what: str):
    """Run a `tokenizers` call; its errors (a damaged tokenizer.json: Exception, or a Rust panic,
    which pyo3 raises as a BaseException) become one EdgeLLMError."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
        raise
    except BaseException as exc:
        msg = str(exc).strip().splitlines()
        raise EdgeLLMError(f"{what}: {msg[0][:300] if msg else type(exc).__name__}") from None


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EdgeLLMError(f"'{p}' is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise EdgeLLMError(f"cannot read '{p}': {exc.strerror or exc}") from None


def _read_json(p: Path) -> dict:
    """A side file's JSON object ({} when the file is absent)."""
    if not p.exists():
        return {}
    try:
        value = json.loads(_read_text(p))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise EdgeLLMError(f"'{p}' is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise EdgeLLMError(f"'{p}' holds a JSON {type(value).__name__}; expected an object")
    return value


def _token_text(t, where: Path, key: str):
    t = t.get("content") if isinstance(t, dict) else t
    if t is not None and not isinstance(t, str):
        raise EdgeLLMError(
            f"'{where}' has {key} of JSON type {type(t).__name__}; expected a string or {{\"content\": ...}}"
        )
    return t


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0
    stop_reason: str = ""
    spec: object = None  # speculate.SpecStats when speculation ran

    @property
    def prompt_rate(self) -> float | None:
        """Prompt tokens/s, or None when no prompt token was timed."""
        return self.prompt_tokens / self.prompt_s if self.prompt_tokens and self.prompt_s > 0 else None

    @property
    def gen_rate(self) -> float | None:
        """Decode tokens/s over the steps after the first token (which comes from the prompt's
        logits), or None when there were none: one token has no generation rate."""
        return (self.gen_tokens - 1) / self.gen_s if self.gen_tokens > 1 and self.gen_s > 0 else None

    def line(self) -> str:
        """One line saying which tokens each rate timed, e.g. 'prompt: 5 tokens, 900.1 tokens/s |
        generation: 32 tokens, decode 31 tokens after the first: 221.0 tokens/s' (the first
        generated token comes from the prompt's logits; each later one is a decode step,
        timed with its sampling, detokenization and the caller's printing)."""
        prompt = f"prompt: {self.prompt_tokens} tokens"
        if self.prompt_rate is not None:
            prompt += f", {self.prompt_rate:.1f} tokens/s"
        gen = f"generation: {self.gen_tokens} token{'s' if self.gen_tokens != 1 else ''}"
        if self.gen_rate is not None:
            n = self.gen_tokens - 1
            gen += f", decode {n} token{'s' if n != 1 else ''} after the first: {self.gen_rate:.1f} tokens/s"
        return f"{prompt} | {gen}"


class Generator:
    """A loaded model + tokenizer. `stream` yields text as it is generated; `chat` keeps a
    conversation whose shared prefix stays in the KV cache between turns."""

    def __init__(self, model, tokenizer: Tokenizer, eos_ids: set[int]):
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.cached: list[int] = []  # tokens whose keys/values are in the model's cache
        self.stats = Stats()
        self.messages: list[dict] = []
        self.template_options: dict = {}  # the chat template's variables (run --no-think: enable_thinking=False)
        self.speculator = None  # speculate.Speculator: draft tokens, verify them in one pass (speculate.attach)

    def encode_prompt(self, prompt: str) -> list[int]:
        if not prompt or not prompt.strip():
            raise EdgeLLMError("the prompt is empty; give some text with -p")
        return self.tokenizer.encode(prompt)

    def stream(
        self, prompt: str | list[int], p: Sampling | None = None, reuse_prefix: bool = False, observe=None
    ) -> Iterator[str]:
        """Generate from a fresh context: text pieces as they are decoded. `reuse_prefix` keeps
        the cached keys/values of the prompt's prefix shared with the previous call (a server's
        continuing chat) and prefills only the rest; those keys/values came from the previous
        call's prefill and decode steps, so they differ from a fresh prefill's in rounding at most.
        `observe(token, logits)`: called for each sampled token (the end-of-sequence token too, as
        OpenAI's logprobs list it) with the logits it came from, before its text is yielded."""
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        if not reuse_prefix:
            self.cached = []
        yield from self._generate(ids, p or Sampling(), observe)

    def grammar(self, kind: str, spec=None):
        """A constraint for `Sampling(grammar=...)`: kind json_schema (spec: a JSON Schema dict),
        json_object, regex or grammar (Lark / GBNF text). runtime/constrain.py; needs llguidance."""
        from .constrain import compile_grammar

        return compile_grammar(self.tokenizer, self.model.config.vocab_size, self.eos_ids, kind, spec)

    def score(self, ids: list[int]) -> np.ndarray:
        """Logits (len(ids), V) at every position of `ids` from a fresh context: row i predicts
        ids[i + 1]. The cache then holds `ids`, so a `stream(ids, reuse_prefix=True)` after it
        prefills only the last token."""
        m = self.model
        if not ids or len(ids) > m.n_ctx:
            raise EdgeLLMError(f"the prompt has {len(ids)} tokens; the context holds {m.n_ctx} (shorten the prompt)")
        m.truncate(0)
        self.cached = []
        with _numeric_damage():
            logits = m.forward(np.array(ids, np.int64), all_logits=True, prompt=True)
        if not np.isfinite(logits).all():
            raise EdgeLLMError(_DAMAGED)
        self.cached = list(ids)
        return logits

    def chat(self, message: str, p: Sampling | None = None) -> Iterator[str]:
        """One chat turn: the user's message in, the assistant's reply streamed out."""
        if not message.strip():
            raise EdgeLLMError("the message is empty")
        self.messages.append({"role": "user", "content": message})
        text = self.tokenizer.apply_chat_template(self.messages, **self.template_options)
        ids = self.tokenizer.encode(text, special=False)
        reply = []
        for piece in self._generate(ids, p or Sampling()):
            reply.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(reply)})

    def _generate(self, ids: list[int], p: Sampling, observe=None) -> Iterator[str]:
        p.check()
        m = self.model
        if len(ids) + 1 > m.n_ctx:
            raise EdgeLLMError(f"the prompt has {len(ids)} tokens; the context holds {m.n_ctx} (shorten the prompt)")
        common = 0  # reuse the cached prefix (chat turns), always recompute at least one token
        while common < min(len(self.cached), len(ids) - 1) and self.cached[common] == ids[common]:
            common += 1
        m.truncate(common)
        common = min(common, m.pos)  # a backend may forget more (numba: a ring no longer holding the window)
        rng = np.random.default_rng(p.seed)
        self.stats = st = Stats(prompt_tokens=len(ids) - common)
        t0 = time.perf_counter()
        logits = _step(m, np.array(ids[common:], np.int64), prompt=True)
        st.prompt_s = time.perf_counter() - t0
        self.cached = list(ids)
        context = list(ids)
        out: list[int] = []
        text, emitted = "", 0
        prefix_at = read_at = 0  # incremental detokenization (TGI-style): O(1) per step, not O(n)
        budget = min(p.max_new_tokens, m.n_ctx - len(ids))
        con = p.grammar.start() if p.grammar is not None else None  # structured output: runtime/constrain.py
        keep = p.keep_special
        t1 = None
        spec = self.speculator if con is None else None  # a grammar's mask is not speculated (yet): plain steps
        tokens = (
            spec.tokens(self, logits, p, rng, context, budget)
            if spec
            else self._plain(logits, p, rng, context, con, observe is not None)
        )
        for tok, logits in tokens:
            if t1 is None:
                t1 = time.perf_counter()  # generation speed counts the decode steps after the first token
            st.gen_tokens += 1
            if observe is not None:
                observe(tok, logits)
            if tok in self.eos_ids and (not p.ignore_eos or con is not None):
                st.stop_reason = "eos"
                break
            if con is not None:
                con.advance(tok)
            out.append(tok)
            context.append(tok)
            # decode the new tokens together with a few before them, so merges across the
            # boundary (leading spaces, multi-byte characters) come out as the full decode would
            before = self.tokenizer.decode(out[prefix_at:read_at], keep)
            after = self.tokenizer.decode(out[prefix_at:], keep)
            if len(after) > len(before) and not after.endswith("\ufffd"):
                text += after[len(before) :]
                prefix_at, read_at = read_at, len(out)
            cut = _find_stop(text, p.stop)
            if cut is not None:
                if cut > emitted:
                    yield text[emitted:cut]
                st.stop_reason = "stop"
                break
            safe = len(text) - _held_back(text, p.stop)
            if safe > emitted and not text.endswith("\ufffd"):
                yield text[emitted:safe]
                emitted = safe
            finished = con is not None and con.done  # the grammar admits nothing more: as end of sequence
            if len(out) >= budget or finished:
                st.stop_reason = "eos" if finished else "length"
                if len(text) > emitted:
                    yield text[emitted:]
                break
        tokens.close()
        st.gen_s = time.perf_counter() - t1 if t1 else 0.0
        st.spec = spec.stats if spec else None

    def _plain(self, logits, p: Sampling, rng, context: list[int], con=None, copy: bool = False):
        """(token, its logits) one decode step at a time; the caller appends each token to
        `context` (and advances the grammar `con`) before asking for the next. With `con`, the
        disallowed tokens are -inf before sampling: in a copy when `copy` (logprobs read the raw
        logits), else in place."""
        while True:
            x = logits
            if con is not None:
                x = logits.copy() if copy else logits
                con.mask(x)
            tok = sample(x, p, rng, np.array(context, np.int64) if p.repetition_penalty != 1.0 else None)
            yield tok, logits
            logits = _step(self.model, np.array([tok], np.int64))
            self.cached.append(tok)


_DAMAGED = (
    "the model computed NaN or infinite values: its weights are damaged "
    "(check the files with 'edgellm info --verify', or export again)"
)


def _step(model, ids: np.ndarray, prompt: bool = False) -> np.ndarray:
    """model.forward(ids, prompt=prompt), whose logits must be finite. NaN/inf come from damaged
    weights (a flipped exponent bit in a float matrix): stop instead of sampling garbage. The
    compiled kernels report a zero softmax sum over NaN scores as ZeroDivisionError (numba's Python
    error model), which is the same damage."""
    with _numeric_damage():
        logits = model.forward(ids, prompt=prompt)
    if not np.isfinite(logits).all():
        raise EdgeLLMError(_DAMAGED)
    return logits


@contextlib.contextmanager
def _numeric_damage():
    try:
        yield
    except (ZeroDivisionError, FloatingPointError):
        raise EdgeLLMError(_DAMAGED) from None
    except SystemError as exc:  # numba: "returned a result with an exception set" around the above
        if isinstance(
            exc.__context__ or exc.__cause__, (ZeroDivisionError, FloatingPointError)
        ) or "exception set" in str(exc):
            raise EdgeLLMError(_DAMAGED) from None
        raise


def _find_stop(text: str, stops) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _held_back(text: str, stops) -> int:
    """Characters at the end of `text` that could start a stop string (not shown yet)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def load(
    path,
    backend: str = "numba",
    threads: int | None = None,
    n_ctx: int | None = None,
    warmup: bool = True,
    kv_cache: str = "auto",
    kernels: str = "auto",
    verify: bool = False,
    device: str = "cpu",
) -> Generator:
    """Open an export directory on the numba (default) or onnxruntime backend. `kv_cache`
    (numba): auto = fp16 beside quantized weights, fp32 beside float ones; or fp16 / fp32.
    `kernels` (numba): the kernel tier, auto = the best the CPU numba compiles for has, or a
    lower one by name (avx512-vnni, avx-vnni, avx2, neon-dotprod, neon, generic; kernels/tiers.py); one the CPU
    lacks is an EdgeLLMError.
    `verify`: check every file against the sha256 recorded at export first (slower start).
    `device="cuda"`: the numba backend's GPU path (runtime/cuda/, numba's CUDA target)."""
    path = Path(path)
    if device != "cpu":
        from .cuda.device import check_device

        check_device(device)
        if backend != "numba":
            raise EdgeLLMError(f"--device {device} runs on the numba backend, not {backend}")
    if device == "cuda":
        from .cuda.device import open_gpu

        open_gpu()  # a missing driver or GPU is a one-line error before any CUDA module loads
        from .cuda.model import CudaModel

        model = CudaModel(path, n_ctx=n_ctx, threads=threads, kv_cache=kv_cache, verify=verify)
    elif backend == "numba":
        from .model import NumbaModel

        model = NumbaModel(path, n_ctx=n_ctx, threads=threads, kv_cache=kv_cache, kernels=kernels, verify=verify)
    elif backend == "onnxruntime":
        from .ort_backend import OrtModel

        model = OrtModel(path, n_ctx=n_ctx, threads=threads, verify=verify)
    else:
        raise EdgeLLMError(f"unknown backend '{backend}'; choose numba or onnxruntime")
    tok = Tokenizer(path)
    eos = set(model.config.eos_token_ids)
    gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
    if any(isinstance(e, bool) or not isinstance(e, int) for e in gen_eos):
        raise EdgeLLMError(f"'{path / 'generation_config.json'}' has eos_token_id {gen_eos!r}; expected token ids")
    eos |= set(gen_eos)
    if warmup:
        with _numeric_damage():
            model.warmup()
    return Generator(model, tok, eos)
