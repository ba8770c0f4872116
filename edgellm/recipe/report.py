"""OUT/report.json, report.md, report.html: every stage's output measured the same way.

For the input model and each stage that makes a model (prune, distill, draft, quantize, export):
- size on disk and parameters;
- perplexity on the held-out split and KL(input ‖ stage) / top-1 agreement against the input
  model (edgellm.evaluate protocol; an export is scored through the model it was made from,
  whose logits it reproduces (export's parity check));
- Numba prompt / decode tokens/s: exports are benchmarked as they are, other model folders are
  exported to a temporary folder first (float or packed, as they are), all in one bench run
  (edgellm.benchmarks: each variant in its own worker process, median of `reps`).
Then the last bench stage's table, rendered by benchmarks/report.py.

Figures are cached in the lock file per stage output (by hash and report settings), so a rerun
that skips every stage measures nothing again.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .lock import Lock, identity
from .spec import Recipe

MEASURED = ("prune", "distill", "draft", "quantize", "export")


def _settings_key(recipe: Recipe, input_id: dict) -> str:
    """What the quality figures depend on (the speed settings have their own key, _speed_key)."""
    quality = {k: recipe.report[k] for k in ("eval-tokens", "ctx")}
    blob = json.dumps({"quality": quality, "data": recipe.data, "input": input_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _size(spec: str) -> int:
    from ..files import dir_size
    from ..modelio import resolve_spec

    return dir_size(Path(resolve_spec(spec)))


def measure(recipe: Recipe, out: Path, progress=None, on_event=lambda what: None, compare: list[Path] = ()) -> dict:
    """Measure what is not cached yet and return the report (also stored under the lock's 'report')."""
    from ..data import split_tokens
    from ..evaluate import evaluate
    from ..modelio import count_parameters, load_model
    from ..pipeline.common import data_tokens
    from ..progress import NULL

    progress = progress or NULL
    out = Path(out)
    lock = Lock(out)
    input_id = identity(recipe.model)
    skey = _settings_key(recipe, input_id)
    r = recipe.report
    entries = [e for e in lock.data["stages"] if e.get("status") == "done"]
    cached_input = lock.data.get("report_input") or {}
    need_input = cached_input.get("key") != skey
    todo = [
        e
        for e in entries
        if e["command"] in MEASURED and (e.get("metrics") or {}).get("key") != f"{skey}:{e['output_sha256']}"
    ]

    ref = ids = None
    cache: dict = {}
    if need_input or any(e["command"] != "export" for e in todo):
        on_event("loading the input model")
        ref = load_model(recipe.model)
        ids = split_tokens(data_tokens(ref.tokenizer, recipe.data), "eval")
    if need_input:
        on_event("scoring the input model")
        q = evaluate(
            ref.model,
            ids,
            reference=ref.model,
            ctx=r["ctx"],
            stride=r["ctx"],
            max_tokens=r["eval-tokens"],
            progress=progress,
            reference_cache=cache,
        )
        cached_input = {
            "key": skey,
            "size_bytes": _size(recipe.model),
            "parameters": count_parameters(ref.model),
            "quality": q.to_dict(),
        }
        lock.data["report_input"] = cached_input
        lock.save()

    source_of = {}  # export dir -> the model stage it came from
    last_model = None
    for e in entries:
        if e["command"] == "export":
            source_of[e["dir"]] = last_model
        elif e["command"] in MEASURED:
            last_model = e
    for e in todo:
        m = {"key": f"{skey}:{e['output_sha256']}", "size_bytes": _size(str(out / e["dir"]))}
        if e["command"] == "export":
            src = source_of.get(e["dir"])
            src_m = (src or {}).get("metrics") or {}
            m.update(
                parameters=src_m.get("parameters", cached_input["parameters"]),
                quality=src_m.get("quality", cached_input["quality"]),
                quality_from=src["dir"] if src else "input",
            )
        else:
            on_event(f"scoring {e['dir']}")
            loaded = load_model(out / e["dir"])
            q = evaluate(
                loaded.model,
                ids,
                reference=ref.model,
                ctx=r["ctx"],
                stride=r["ctx"],
                max_tokens=r["eval-tokens"],
                progress=progress,
                reference_cache=cache,
            )
            m.update(parameters=count_parameters(loaded.model), quality=q.to_dict())
            del loaded
        e["metrics"] = {**(e.get("metrics") or {}), **m}
    del ref
    for e in entries:
        m = e.get("metrics") or {}
        if "speed" in m and m.get("speed_key") != _speed_key(r, e):
            m.pop("speed")  # measured with other pp/tg/reps/threads
    if r["speed"]:
        _measure_speed(
            out, [e for e in entries if e["command"] in MEASURED and "speed" not in e["metrics"]], r, on_event
        )
    lock.save()
    return build(recipe, out, lock, compare)


def _speed_key(r: dict, e: dict) -> str:
    return json.dumps([r["prompt-tokens"], r["gen-tokens"], r["reps"], r["threads"], e["output_sha256"]])


def _measure_speed(out: Path, entries: list[dict], r: dict, on_event) -> None:
    """Numba pp/tg tokens/s for each entry's output, in one bench run (temporary exports where needed)."""
    if not entries:
        return
    from edgellm.benchmarks.run import Settings, run_variants
    from edgellm.benchmarks.variants import parse

    from ..export.exporter import export_model
    from ..export.weights import Options
    from ..modelio import load_model

    tmp_root = Path(tempfile.mkdtemp(prefix=".report-exports-", dir=out))
    try:
        variants = []
        for e in entries:
            path = out / e["dir"]
            if e["command"] != "export":
                on_event(f"exporting {e['dir']} for the speed run")
                path = tmp_root / e["dir"]
                export_model(load_model(out / e["dir"]), path, Options(), check=False)
            v = parse(f"{path}:numba")
            v.label = e["dir"]
            variants.append(v)
        settings = Settings(
            prompt_tokens=r["prompt-tokens"],
            gen_tokens=r["gen-tokens"],
            reps=r["reps"],
            threads=r["threads"],
            quality=False,
        )
        on_event(f"benchmarking {len(variants)} output(s) on the numba runtime")
        rows = run_variants(variants, settings, lambda i, label, phase: None)
        for e, row in zip(entries, rows):
            if row.get("status") == "ok":
                e["metrics"]["speed"] = {
                    "pp_tokens_per_s": row["pp"]["tokens_per_s"],
                    "tg_tokens_per_s": row["tg"]["tokens_per_s"],
                    "peak_rss_bytes": row["memory"]["peak_rss_bytes"],
                    "threads": settings.resolved_threads(),
                    "prompt_tokens": r["prompt-tokens"],
                    "gen_tokens": r["gen-tokens"],
                    "reps": r["reps"],
                    "temporary_export": e["command"] != "export",
                }
            else:
                e["metrics"]["speed"] = {"error": row.get("error", "failed")}
            e["metrics"]["speed_key"] = _speed_key(r, e)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def compared_rows(report: dict, other: Path) -> list[dict]:
    """Another compress run's outputs (its report.json), when it scored the same input the same way."""
    from ..errors import EdgeLLMError

    path = Path(other) / "report.json"
    if not path.is_file():
        raise EdgeLLMError(
            f"--compare '{other}' has no report.json; give the output folder of another 'edgellm compress' run"
        )
    theirs = json.loads(path.read_text())
    same = ("model", "data")
    keys = ("eval-tokens", "ctx")
    if any(theirs.get(k) != report[k] for k in same) or any(
        theirs["settings"].get(k) != report["settings"][k] for k in keys
    ):
        raise EdgeLLMError(
            f"--compare '{other}' was measured on another input or protocol (model, data, eval-tokens, ctx must match: "
            f"{theirs.get('model')}, {theirs['settings'].get('eval-tokens')}, {theirs['settings'].get('ctx')}); rerun "
            "it with the same report settings"
        )
    name = Path(other).name
    return [
        {**r, "stage": f"{name}/{r['stage']}", "compared": str(other)}
        for r in theirs["outputs"]
        if r["stage"] != "input"
    ]


def build(recipe: Recipe, out: Path, lock: Lock, compare: list[Path] = ()) -> dict:
    inp = lock.data.get("report_input") or {}
    rows = [
        {
            "stage": "input",
            "command": None,
            "path": recipe.model,
            "size_bytes": inp.get("size_bytes"),
            "parameters": inp.get("parameters"),
            "quality": inp.get("quality"),
            "speed": None,
        }
    ]
    for e in lock.data["stages"]:
        if e["command"] in MEASURED and e.get("status") == "done":
            m = e.get("metrics") or {}
            rows.append(
                {
                    "stage": e["dir"],
                    "command": e["command"],
                    "path": str(out / e["dir"]),
                    "size_bytes": m.get("size_bytes"),
                    "parameters": m.get("parameters"),
                    "quality": m.get("quality"),
                    "quality_from": m.get("quality_from"),
                    "speed": m.get("speed"),
                }
            )
    bench = None
    for e in lock.data["stages"]:
        if e["command"] == "bench" and e.get("status") == "done" and (out / e["dir"] / "report.json").is_file():
            bench = {"stage": e["dir"], "report": json.loads((out / e["dir"] / "report.json").read_text())}
    report = {
        "schema": "edgellm.compress.report",
        "schema_version": 1,
        "recipe": lock.data.get("recipe"),
        "model": recipe.model,
        "code_version": lock.data.get("code_version"),
        "settings": recipe.report,
        "data": recipe.data or "builtin:pydoc",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stages": [
            {k: e.get(k) for k in ("dir", "command", "options", "status", "seconds", "error")}
            for e in lock.data["stages"]
        ],
        "outputs": rows,
        "bench": bench,
    }
    for other in compare:
        report["outputs"] += compared_rows(report, other)
    return report


# ---- rendering --------------------------------------------------------------------------------

HEADERS = ["output", "size", "parameters", "perplexity", "KL vs input", "top-1", "pp tok/s", "tg tok/s"]
DASH = "—"


def _rate(s: dict | None, spread: bool = True) -> str:
    return (
        DASH
        if not s
        else f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"
        if s.get("n", 1) > 1 and spread
        else f"{s['median']:.1f}"
    )


def rows_text(report: dict, spread: bool = True) -> list[list[str]]:
    """One row of strings per output (HEADERS order); `spread=False` shows medians only."""
    out = []
    for r in report["outputs"]:
        q, sp = r.get("quality") or {}, r.get("speed") or {}
        out.append(
            [
                r["stage"] + (f" (quality of {r['quality_from']})" if r.get("quality_from") and spread else ""),
                DASH if r["size_bytes"] is None else f"{r['size_bytes'] / 2**20:.1f} MB",
                DASH if r["parameters"] is None else f"{r['parameters'] / 1e6:.2f} M",
                f"{q['perplexity']:.3f}" if "perplexity" in q else DASH,
                f"{q['kl']:.4f}" if "kl" in q else DASH,
                f"{q['top1'] * 100:.1f}%" if "top1" in q else DASH,
                sp.get("error", _rate(sp.get("pp_tokens_per_s"), spread)) if sp else DASH,
                DASH if not sp or "error" in sp else _rate(sp.get("tg_tokens_per_s"), spread),
            ]
        )
    return out


def _notes(report: dict) -> list[str]:
    s = report["settings"]
    speed = next((r["speed"] for r in report["outputs"] if r.get("speed") and "threads" in r["speed"]), None)
    notes = [
        f"Quality: perplexity on {report['data']} (evaluation split, {s['eval-tokens']} tokens max, ctx {s['ctx']}, "
        f"stride {s['ctx']}); KL(input ‖ output) and top-1 agreement against the input model {report['model']}. "
        "An export is scored through the model folder it was exported from (export checks that their logits agree)."
    ]
    if speed:
        notes.append(
            f"Speed: Numba runtime, pp = prefill of {speed['prompt_tokens']} tokens, tg = {speed['gen_tokens']} decode "
            f"steps, median (min–max) of {speed['reps']} repetitions, {speed['threads']} thread(s), each output in its "
            "own process; model folders are exported to a temporary folder for this run."
        )
    others = sorted({r["compared"] for r in report["outputs"] if r.get("compared")})
    if others:
        notes.append(
            f"Rows named OTHER/stage come from the report of {', '.join(others)} (same input model, data and quality "
            "protocol, so perplexity and KL compare exactly; its speed was measured in its own run: compare speed side "
            "by side with a bench stage's 'with:')."
        )
    notes.append(f"Code {report['code_version']}; {report['date']}.")
    return notes


def markdown(report: dict) -> str:
    from edgellm.benchmarks import report as bench_report

    lines = [f"# edgellm compress — {Path(report['recipe'] or '').name or 'recipe'} on {report['model']}", ""]
    lines += ["| stage | command | status | seconds |", "|---|---|---|---:|"]
    lines += [
        f"| {s['dir']} | {s['command']} | {s['status']}{': ' + s['error'] if s.get('error') else ''} | "
        f"{s.get('seconds') or DASH} |"
        for s in report["stages"]
    ]
    lines += [
        "",
        "## Every stage's output",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|---|" + "---:|" * (len(HEADERS) - 1),
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows_text(report)]
    lines += [""] + [f"- {n}" for n in _notes(report)] + [""]
    if report["bench"]:
        body = bench_report.markdown(report["bench"]["report"]).split("\n", 1)[1]
        lines += [f"## Bench ({report['bench']['stage']})", body]
    return "\n".join(lines)


def _plots(report: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgellm.benchmarks.report import png_base64

    rows = [r for r in report["outputs"] if r.get("size_bytes") and (r.get("quality") or {}).get("perplexity")]
    if not rows:
        return []
    sp = [r for r in rows if (r.get("speed") or {}).get("tg_tokens_per_s")]
    fig, axes = plt.subplots(1, 2 if sp else 1, figsize=(11 if sp else 6, 4.2), squeeze=False)
    axes = axes[0]
    x = [r["size_bytes"] / 2**20 for r in rows]
    axes[0].scatter(x, [r["quality"]["perplexity"] for r in rows], s=60, edgecolors="black")
    for xi, r in zip(x, rows):
        axes[0].annotate(
            r["stage"], (xi, r["quality"]["perplexity"]), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
    axes[0].set_yscale("log")
    axes[0].set_xlabel("size on disk (MB)")
    axes[0].set_ylabel("perplexity (log)")
    axes[0].set_title("Quality vs size, stage by stage")
    if sp:
        axes[1].barh(range(len(sp)), [r["speed"]["tg_tokens_per_s"]["median"] for r in sp], color="#dd8452", label="tg")
        axes[1].barh(
            [i + 0.4 for i in range(len(sp))],
            [r["speed"]["pp_tokens_per_s"]["median"] for r in sp],
            height=0.4,
            color="#4c72b0",
            label="pp",
        )
        axes[1].set_yticks(range(len(sp)), [r["stage"] for r in sp])
        axes[1].invert_yaxis()
        axes[1].set_xscale("log")
        axes[1].set_xlabel("tokens/s (Numba, median, log)")
        axes[1].legend()
        axes[1].set_title("Numba speed of each output")
    for ax in axes:
        ax.grid(alpha=0.3)
    out = [("Quality and speed per stage", png_base64(fig))]
    plt.close(fig)
    return out


def html_page(report: dict) -> str:
    from edgellm.benchmarks import report as bench_report

    e = html.escape
    stages = "".join(
        f"<tr><td>{e(s['dir'])}</td><td>{e(s['command'])}</td>"
        f"<td>{e(s['status'])}{e(': ' + s['error']) if s.get('error') else ''}</td>"
        f"<td>{s.get('seconds') or DASH}</td></tr>"
        for s in report["stages"]
    )
    head = "".join(f"<th>{e(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows_text(report))
    notes = "".join(f"<li>{e(n)}</li>" for n in _notes(report))
    figs = "".join(f'<h2>{e(t)}</h2><img alt="{e(t)}" src="data:image/png;base64,{b}">' for t, b in _plots(report))
    bench = ""
    if report["bench"]:
        b = report["bench"]["report"]
        bh = "".join(f"<th>{e(h)}</th>" for h in bench_report.HEADERS)
        bb = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in bench_report.table_rows(b))
        bfigs = "".join(
            f'<h3>{e(t)}</h3><img alt="{e(t)}" src="data:image/png;base64,{p}">' for t, p in bench_report.plots(b)
        )
        bn = "".join(f"<li>{e(n)}</li>" for n in bench_report.notes(b))
        bench = f"<h2>Bench ({e(report['bench']['stage'])})</h2><table><tr>{bh}</tr>{bb}</table><ul>{bn}</ul>{bfigs}"
    title = f"edgellm compress — {e(Path(report['recipe'] or '').name or 'recipe')} on {e(report['model'])}"
    raw = e(json.dumps(report, indent=1))
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{bench_report.CSS}</style></head><body>"
        f"<h1>{title}</h1><table><tr><th>stage</th><th>command</th><th>status</th><th>seconds</th></tr>{stages}</table>"
        f"<h2>Every stage's output</h2><table><tr>{head}</tr>{body}</table><ul>{notes}</ul>{figs}{bench}"
        f"<details><summary>report.json</summary><pre>{raw}</pre></details></body></html>\n"
    )


def write(report: dict, out: Path) -> None:
    """report.json/.md/.html in OUT, each written to a temporary file and renamed."""
    for name, text in (
        ("report.json", json.dumps(report, indent=1) + "\n"),
        ("report.md", markdown(report)),
        ("report.html", html_page(report)),
    ):
        tmp = Path(out) / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, Path(out) / name)
