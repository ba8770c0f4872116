"""report.json (schema: report.schema.json), report.md (a table) and report.html (one offline file,
matplotlib plots embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
DASH = "—"


def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def validate(report: dict) -> None:
    """Raise jsonschema.ValidationError if the report does not match the schema (skipped without jsonschema)."""
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(report, schema())


# ---- one table, three renderings ---------------------------------------------------------

HEADERS = [
    "variant",
    "backend",
    "size",
    "pp tok/s",
    "tg tok/s",
    "TTFT",
    "load cold / warm",
    "peak RSS",
    "J/token (tg)",
    "device tg tok/s (est.: memory / compute bound)",
    "perplexity",
    "KL",
    "top-1",
    "speculation: accepted / mean length / speed-up",
    "status",
]
DEVICE_COLUMN = HEADERS.index("device tg tok/s (est.: memory / compute bound)")
SPEC_COLUMN = HEADERS.index("speculation: accepted / mean length / speed-up")


def _mb(n) -> str:
    return DASH if n is None else f"{n / 2**20:.1f} MB"


def _rate(s: dict | None, spread: bool = True) -> str:
    if not s:
        return DASH
    return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})" if s["n"] > 1 and spread else f"{s['median']:.1f}"


def _secs(x) -> str:
    return DASH if x is None else (f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s")


def _energy_label(e: dict) -> str:
    """meas. (counters) | est. generic (host, no counters) | est. rpi5 (device time estimated)."""
    if e["kind"] == "measured":
        return "meas."
    return (
        f"est. {e['target']}"
        if e.get("device")
        else ("est. generic" if e["target"] == "host" else f"est. {e['target']}, host time")
    )


def _device_rate(d: dict | None) -> str:
    if not d:
        return DASH
    cmp = d.get("tg_tokens_per_s_compute_bound")
    return f"{d['tg_tokens_per_s_memory_bound']:.1f} / " + (DASH if cmp is None else f"{cmp:.1f}")


def _spec(sp: dict | None) -> str:
    """`EXPORT+lookup` / `EXPORT+DRAFT` rows: pooled acceptance, mean accepted length, speed-up vs plain greedy."""
    if not sp:
        return DASH
    acc, mean, up = sp.get("acceptance"), sp.get("mean_accepted"), sp.get("speedup")
    return (
        f"{DASH if acc is None else f'{100 * acc:.0f}%'} / {DASH if mean is None else f'{mean:.2f}'} / "
        f"{DASH if up is None else f'{up:.2f}x'}"
    )


def table_rows(report: dict, spread: bool = True) -> list[list[str]]:
    """One row of strings per variant (HEADERS order); `spread=False` shows medians only."""
    rows = []
    for r in report["variants"]:
        if r["status"] != "ok":
            rows.append([r["label"], r["backend"]] + [DASH] * (len(HEADERS) - 3) + [f"failed: {r.get('error', '?')}"])
            continue
        q = r.get("quality") or {}
        e = r.get("energy") or {}
        j = e.get("j_per_token_tg")
        rows.append(
            [
                r["label"],
                r["backend"] + (f" [{r['kernels']}]" if r.get("kernels") else ""),
                _mb(r["size_bytes"]),
                _rate(r["pp"]["tokens_per_s"], spread),
                _rate(r["tg"]["tokens_per_s"], spread),
                _secs(r["ttft_s"]["median"]),
                f"{_secs(r['load']['cold_s'])} / {_secs(r['load']['warm_s'])}",
                _mb(r["memory"]["peak_rss_bytes"]),
                DASH if j is None else f"{j:.3f} ({_energy_label(e)})",
                _device_rate(e.get("device")),
                f"{q['perplexity']:.3f}" if "perplexity" in q else DASH,
                f"{q['kl']:.4f}" if "kl" in q else DASH,
                f"{q['top1'] * 100:.1f}%" if "top1" in q else DASH,
                _spec(r.get("speculation")),
                "ok",
            ]
        )
    return rows


def notes(report: dict) -> list[str]:
    """The report's footnotes: what pp, tg, load and energy mean in this run (Markdown and HTML)."""
    s, env, prof = report["settings"], report["environment"], report["energy_profile"]
    kinds = {r["energy"]["kind"] for r in report["variants"] if r.get("energy")}
    lines = [
        f"pp = prefill of {s['prompt_tokens']} tokens from an empty cache, tg = {s['gen_tokens']} greedy decode "
        f"steps after a 1-token prefill (tokens/s = {s['gen_tokens']} / their time); median (min–max) over "
        f"{s['reps']} repetitions after a warm-up; {s['threads']} thread(s); TTFT = tokenize + prefill + first token.",
        "Load cold = first load in a fresh process after evicting the files from the page cache; warm = reload with "
        "the files cached.",
        "Peak RSS = high-water resident set of the variant's own worker process after load and the speed phases.",
        _energy_note(prof, kinds),
        f"Quality: perplexity on {s['data']} (evaluation split, {s['eval_tokens']} tokens max, ctx {s['ctx']}, stride "
        f"{s['stride']}); "
        f"KL(reference ‖ variant) and top-1 agreement against the first variant, {report['reference']}.",
        f"Machine: {env['cpu']['model']}, {env['cpu']['usable_cpus']} usable CPU(s), "
        f"{_mb(env['memory_bytes']) if env['memory_bytes'] else '?'} RAM, "
        f"{env['os']}, Python {env['python']}; git {((env.get('git') or {}).get('commit') or '?')[:10]}"
        f"{' (dirty)' if (env.get('git') or {}).get('dirty') else ''}; {env['date']}.",
    ]
    return lines[:-1] + _spec_note(report) + lines[-1:]  # the machine line last


def _spec_note(report: dict) -> list[str]:
    sp = next((r["speculation"] for r in report["variants"] if r.get("speculation")), None)
    if sp is None:
        return []
    return [
        f"Speculation (EXPORT+lookup / EXPORT+DRAFT rows): on {', '.join(t['task'] for t in sp['tasks'])}, greedy, "
        f"at most {sp['gen_tokens']} new tokens, plain and speculating interleaved ({sp['reps']} pairs, draft max "
        f"{sp['k_max']}), every speculating run checked equal to plain greedy; accepted = drafted tokens accepted, "
        "mean length = accepted drafts per verify pass, speed-up = plain over speculating decode time (sums of the "
        "tasks' medians); per task and by draft position in report.json."
    ]


def _energy_note(prof: dict, kinds: set) -> str:
    head = f"Energy ({', '.join(sorted(kinds)) or 'n/a'}): "
    if "estimated" not in kinds:
        return head + "measured with the machine's counters (RAPL / NVML)."
    if prof.get("bandwidth_gbs") is None:
        return head + (
            f"no energy counters are readable here, so a generic estimate, not a measurement of this machine: "
            f"{prof['idle_w']} W idle + CPU utilisation × ({prof['peak_w']} − {prof['idle_w']}) W per usable CPU, "
            f"over the measured time; {prof['source']}."
        )
    return head + (
        f"estimated for {prof['description']}: the device's decode time per token is estimated as the larger of "
        f"a memory bound (weight bytes read per token ÷ {prof['bandwidth_gbs']} GB/s) and a compute bound "
        f"(multiply-accumulates per token ÷ {prof['peak_gmacs_int8']:g} int8 / {prof['peak_gmacs_fp32']:g} fp32 "
        "GMAC/s), "
        f"both shown in the device column (tokens/s; real decode is slower than either); J/token = "
        f"{prof['peak_w']} W (all cores busy) × that time. Hardware: {prof['hardware_source']}. Power: "
        f"{prof['source']}. "
        f"report.json also gives the power curve × this machine's measured time (j_per_token_tg_at_host_time), "
        f"too low wherever the device is slower than this machine."
    )


def markdown(report: dict) -> str:
    rows = table_rows(report)
    esc = lambda c: c.replace("|", "\\|")  # noqa: E731
    lines = [
        f"# edgellm bench — {report['environment']['date'][:10]}",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(HEADERS) - 1)) + "|---|",
    ]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    lines += [""] + [f"- {n}" for n in notes(report)] + [""]
    return "\n".join(lines)


# ---- plots -------------------------------------------------------------------------------


def png_base64(fig) -> str:
    """A matplotlib figure as a base64 PNG (for an <img src="data:..."> in report.html)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plots(report: dict) -> list[tuple[str, str]]:
    """[(title, base64 PNG)]: tg tokens/s vs size coloured by perplexity; pp/tg bars with spread; peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["variants"] if r["status"] == "ok"]
    if not ok:
        return []
    out = []
    labels = [r["label"] for r in ok]
    size = [r["size_bytes"] / 2**20 for r in ok]
    tg = [r["tg"]["tokens_per_s"]["median"] for r in ok]
    ppl = [(r.get("quality") or {}).get("perplexity") for r in ok]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    have = [p is not None for p in ppl]
    if any(have):
        sc = ax.scatter(
            [s for s, h in zip(size, have) if h],
            [t for t, h in zip(tg, have) if h],
            s=70,
            c=[p for p in ppl if p is not None],
            cmap="viridis_r",
            edgecolors="black",
        )
        fig.colorbar(sc, ax=ax, label="perplexity (lower is better)")
    if not all(have):
        ax.scatter(
            [s for s, h in zip(size, have) if not h],
            [t for t, h in zip(tg, have) if not h],
            s=70,
            c="lightgrey",
            edgecolors="black",
        )
    for x, y, label in zip(size, tg, labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.margins(x=0.08, y=0.12)
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi + 0.45 * (hi - lo))  # room for the labels right of the points
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("generation tokens/s (median)")
    ax.set_title("Speed vs size, coloured by perplexity")
    ax.grid(alpha=0.3)
    out.append(("Generation speed vs size", png_base64(fig)))
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, max(2.5, 0.5 * len(ok) + 1.5)))
    for ax, key, title in zip(axes, ("pp", "tg"), ("prompt processing", "generation")):
        st = [r[key]["tokens_per_s"] for r in ok]
        med = [s["median"] for s in st]
        err = [[m - s["min"] for m, s in zip(med, st)], [s["max"] - m for m, s in zip(med, st)]]
        ax.barh(range(len(ok)), med, xerr=err, capsize=4, color="#4c72b0" if key == "pp" else "#dd8452")
        ax.set_yticks(range(len(ok)), labels if key == "pp" else [""] * len(ok))
        ax.invert_yaxis()
        ax.set_xlabel("tokens/s (median, bars = min–max)")
        ax.set_title(f"{title} ({report['settings']['prompt_tokens' if key == 'pp' else 'gen_tokens']} tokens)")
        ax.grid(axis="x", alpha=0.3)
    out.append(("Tokens/s per variant, with spread", png_base64(fig)))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.45 * len(ok) + 1.2)))
    ax.barh(range(len(ok)), [r["memory"]["peak_rss_bytes"] / 2**20 for r in ok], color="#55a868", label="peak RSS")
    ax.barh(range(len(ok)), size, color="none", edgecolor="black", hatch="//", label="size on disk")
    ax.set_yticks(range(len(ok)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("MB")
    ax.legend()
    ax.set_title("Peak RSS of each variant's process vs file size")
    out.append(("Memory", png_base64(fig)))
    plt.close(fig)
    return out


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child,td:nth-child(2){text-align:left}tr.failed{background:#fde2e2}
img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}"""


def html_page(report: dict) -> str:
    e = html.escape
    rows = table_rows(report)
    head = "".join(f"<th>{e(h)}</th>" for h in HEADERS)
    body = "".join(
        f'<tr class="{"ok" if r[-1] == "ok" else "failed"}">' + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
        for r in rows
    )
    figs = "".join(f'<h2>{e(t)}</h2><img alt="{e(t)}" src="data:image/png;base64,{b}">' for t, b in plots(report))
    notes_html = "".join(f"<li>{e(n)}</li>" for n in notes(report))
    raw = e(json.dumps(report, indent=1))
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>edgellm bench</title><style>{CSS}</style></head>'
        "<body>"
        f"<h1>edgellm bench — {e(report['environment']['date'][:10])}</h1><table><tr>{head}</tr>{body}</table>"
        f"<ul>{notes_html}</ul>{figs}<details><summary>report.json</summary><pre>{raw}</pre></details></body></html>\n"
    )


def write(report: dict, folder: Path) -> None:
    """Write report.json, report.md and report.html into `folder` (the caller makes it atomic)."""
    validate(report)
    folder = Path(folder)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report))
    (folder / "report.html").write_text(html_page(report))
