"""The speculation phase of a bench variant `EXPORT+lookup` or `EXPORT+DRAFT_EXPORT` (issue 29).

On each task (text that copies from its prompt, and free generation) the export generates greedily,
plain and speculating in turn (ABAB..., `reps` pairs, at most `gen_tokens` new tokens each, the
chat template when the export has one); every speculating run must give plain greedy's tokens
(else the phase fails). Figures: decode time (the prompt's prefill, equal for both, left out),
medians per task; the row's speed-up is the sum of the plain medians over the sum of the
speculating ones (the same tokens); acceptance, mean accepted length (accepted drafts per verify
pass) and the acceptance by draft position (`SpecStats.curve`) pool every speculating run.
benchmarks/scripts/speculate.py runs the same tasks with its own tables.
"""

from __future__ import annotations

import statistics
from pathlib import Path

CODE = '''def merge_sorted(a, b):
    """Merge two sorted lists into one sorted list."""
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out
'''
PARAGRAPH = (
    "The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual reefs "
    "and 900 islands stretching for over 2,300 kilometres over an area of approximately 344,400 square "
    "kilometres. The reef is located in the Coral Sea, off the coast of Queensland, Australia. It can be seen "
    "from outer space and is the world's biggest single structure made by living organisms. The reef is "
    "composed of and built by billions of tiny organisms, known as coral polyps. It supports a wide diversity "
    "of life and was selected as a World Heritage Site in 1981."
)
DOCUMENT = (
    "Product manual, section 4: Resetting the device. To reset the router to its factory settings, press "
    "and hold the reset button on the back panel for ten seconds until the power light blinks orange. The "
    "router then restarts, which takes about two minutes. After the restart, connect to the network named "
    "on the label under the device and open the setup page at http://192.168.0.1 to configure it again. "
    "Resetting erases every setting, including the Wi-Fi password and the port forwarding rules."
)
TASKS = {
    "type hints": f"Rewrite this Python function with type hints. Keep everything else the same.\n\n{CODE}",
    "summarize": f"Summarize this paragraph in two sentences.\n\n{PARAGRAPH}",
    "answer from document": f"{DOCUMENT}\n\nUsing the manual above, how do I reset the router to factory settings?",
    "free generation": "Write a short story about a fox who learns to play the violin.",
}


def _frame(tok, msg: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": msg}]) if tok.chat_template else msg


def task_ids(gen, msg: str) -> list[int]:
    """The task's prompt ids: in the export's chat template when it has one."""
    return gen.tokenizer.encode(_frame(gen.tokenizer, msg), special=False)


def generate(gen, ids: list[int], n: int, speculator) -> tuple[list[int], float, object]:
    """Greedy tokens, decode seconds and the stats of one generation (speculating when `speculator`)."""
    from edgellm.runtime.generate import Sampling

    gen.speculator = speculator
    toks: list[int] = []
    for _ in gen.stream(ids, Sampling(temperature=0, max_new_tokens=n), observe=lambda t, lg: toks.append(t)):
        pass
    return toks, gen.stats.gen_s, gen.stats


def drafter_for(gen, with_: str, threads: int):
    """'lookup' -> prompt lookup; else a draft export directory, opened beside the target and checked
    ('DRAFT+lookup': lookup first, that draft elsewhere)."""
    from edgellm.runtime.speculate import DraftModel, Lookup, LookupThenDraft, check_draft

    if with_ == "lookup":
        return Lookup()
    from edgellm.benchmarks.variants import split_lookup
    from edgellm.runtime.model import NumbaModel

    path, both = split_lookup(with_)
    dm = NumbaModel(path, n_ctx=gen.model.n_ctx, threads=threads, kernels="auto")
    dm.warmup()
    check_draft(gen.model, dm, Path(gen.model.export.path), Path(path))
    return LookupThenDraft(Lookup(), DraftModel(dm)) if both else DraftModel(dm)


def run_tasks(
    gen, drafter, gen_tokens: int, reps: int, k_max: int = 8, on_task=lambda name: None, verbose=False
) -> dict:
    """Plain vs speculating on every task, interleaved; the row's `speculation` figures."""
    from edgellm.runtime.speculate import SpecStats, Speculator

    pooled = SpecStats()
    rows = []
    for name, msg in TASKS.items():
        on_task(name)
        ids = task_ids(gen, msg)
        plain_s, spec_s, n_tok, task_stats = [], [], 0, SpecStats()
        for _ in range(reps):
            base, s0, st0 = generate(gen, ids, gen_tokens, None)
            toks, s1, st = generate(gen, ids, gen_tokens, Speculator(drafter, k_max=k_max))
            if toks != base:
                raise ValueError(f"speculation changed the greedy output on the task '{name}' (a bug: report it)")
            plain_s.append(s0)
            spec_s.append(s1)
            n_tok = st0.gen_tokens
            pooled.merge(st.spec)
            task_stats.merge(st.spec)
        a, b = statistics.median(plain_s), statistics.median(spec_s)
        if verbose:
            print(f"{name}: {a:.3f}s -> {b:.3f}s  x{a / b:.2f}  {task_stats.line()}", flush=True)
        rows.append(
            {
                "task": name,
                "prompt_tokens": len(ids),
                "tokens": n_tok,
                "plain_s": a,
                "spec_s": b,
                "speedup": a / b if b > 0 else None,
                "acceptance": task_stats.acceptance,
                "mean_accepted": task_stats.mean_accepted,
                "verify_passes": task_stats.rounds,
                "plain_steps": task_stats.steps,
                "acceptance_by_position": task_stats.curve,
                "plain_values": plain_s,
                "spec_values": spec_s,
            }
        )
    plain, spec = sum(r["plain_s"] for r in rows), sum(r["spec_s"] for r in rows)
    return {
        "drafter": getattr(drafter, "name", "?"),
        "k_max": k_max,
        "gen_tokens": gen_tokens,
        "reps": reps,
        "equal_output": True,  # checked on every run above
        "speedup": plain / spec if spec > 0 else None,
        "acceptance": pooled.acceptance,
        "mean_accepted": pooled.mean_accepted,
        "verify_passes": pooled.rounds,
        "drafted": pooled.drafted,
        "accepted": pooled.accepted,
        "plain_steps": pooled.steps,
        "acceptance_by_position": pooled.curve,
        "proposals_by_drafter": dict(getattr(drafter, "used", {})) or None,  # lookup + draft: who proposed
        "checked_by_position": pooled.tested,
        "accepted_by_position": pooled.passed,
        "tasks": rows,
    }


def measure(path: str, with_: str, threads: int, gen_tokens: int, reps: int, on_task=lambda name: None) -> dict:
    """Open the export (and its draft) on the numba runtime and run the tasks."""
    from edgellm.runtime.generate import Tokenizer, load

    tok = Tokenizer(Path(path))
    longest = max(len(tok.encode(_frame(tok, msg), special=False)) for msg in TASKS.values())
    gen = load(path, threads=threads, n_ctx=longest + gen_tokens + 16)  # + room for a last verify pass
    drafter = drafter_for(gen, with_, threads)
    out = run_tasks(gen, drafter, gen_tokens, reps, on_task=on_task)
    out["with"] = with_
    return out
