"""What more than one study script needs, written once: a bench worker's speed measurement
(`measure`, `numba_speed`), llama.cpp's quantizer, a run's header and Markdown/JSON output, and
`edgellm serve` as a child process. Not a script (no entry point); heavy libraries (llama_cpp,
openai, psutil) are imported inside the functions that use them."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ---- speed through `edgellm bench`'s worker ----------------------------------------------------


def measure(
    path: str,
    backend: str,
    threads: int,
    tokens: int = 128,
    pp: int = 512,
    reps: int = 3,
    env: dict | None = None,
    kernels: str | None = None,
) -> dict:
    """One bench worker on one model: its result (status, pp, tg, load, memory, traffic; see
    report.schema.json's ok_row) plus flat medians for tables. Speed only (no quality pass).
    `kernels`: the numba kernel tier to force (None: the best the target CPU has)."""
    from edgellm.benchmarks.run import Settings, run_worker
    from edgellm.benchmarks.variants import parse

    variant = parse(f"{path}:{backend}").to_dict()
    if kernels:
        variant["kernels"] = kernels
    settings = Settings(prompt_tokens=pp, gen_tokens=tokens, reps=reps, threads=threads, quality=False)
    work = Path(tempfile.mkdtemp(prefix="edgellm-decode-"))
    try:
        (work / "ref").mkdir()
        res = run_worker(variant, settings, work / "ref", True, work, env=env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if res["status"] == "ok":
        res.update(
            tg_values=res["tg"]["tokens_per_s"]["values"],
            tg_median=res["tg"]["tokens_per_s"]["median"],
            pp_values=res["pp"]["tokens_per_s"]["values"],
            pp_median=res["pp"]["tokens_per_s"]["median"],
            first_token_s=res["load"]["first_token_s"],
            peak_rss_mb=res["memory"]["peak_rss_bytes"] / 2**20,
            peak_rss_total_mb=res["memory"]["peak_rss_total_bytes"] / 2**20,
        )
    return res


def numba_speed(onnx_dir: str | Path, threads: int) -> dict:
    """Decode (tg, 64 tokens) and prompt (pp, 64 tokens) tokens/s of the numba runtime on one export,
    median of 3, one bench worker: {"tg", "tg_all", "pp", "load_s"}, or {"error"} when it failed."""
    r = measure(str(onnx_dir), "numba", threads, tokens=64, pp=64, reps=3)
    if r["status"] != "ok":
        return {"error": r["error"]}
    return {"tg": r["tg_median"], "tg_all": r["tg_values"], "pp": r["pp_median"], "load_s": r["first_token_s"]}


# ---- llama.cpp ----------------------------------------------------------------------------------


def llama_quantize(src: Path, dst: Path, ftype: int | str, threads: int, allow_requantize: bool = False) -> None:
    """llama.cpp's own quantizer (llama_model_quantize) from `src` to `dst`. `ftype`: a
    LLAMA_FTYPE_* value or the name of one in llama_cpp. Raises RuntimeError on a non-zero return."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, ftype) if isinstance(ftype, str) else ftype
    p.nthread = threads
    p.allow_requantize = allow_requantize
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), p)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) returned {rc}")


# ---- output ------------------------------------------------------------------------------------


def cpu_name() -> str:
    """lscpu's "Model name" (the CPU every figure must name), or "unknown"; a name without a model
    number (a VM's "AMD EPYC", or "Intel(R) Xeon(R) Processor @ 2.80GHz") gets lscpu's family and
    model and LLVM's name for the core beside it: "AMD EPYC (family 26 model 2, znver5)"."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines())}
    name = fields.get("Model name", "unknown")
    if any(c.isdigit() for c in name.split("@")[0]):  # a model number, not only "@ 2.80GHz"
        return name
    extra = (
        [f"family {fields['CPU family']} model {fields['Model']}"]
        if "CPU family" in fields and "Model" in fields
        else []
    )
    try:
        import llvmlite.binding as llvm

        extra.append(llvm.get_host_cpu_name())
    except ImportError:
        pass
    return f"{name} ({', '.join(extra)})" if extra else name


def run_header(threads: int) -> dict:
    """The first keys of a result file: when, on which CPU, with how many threads."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_name(),  # the model, not platform.processor()'s "x86_64"
        "threads": threads,
    }


def write_table(table: str, rows: list[dict], out: Path | None) -> None:
    """Print a Markdown table; with `out`, write it there and the rows beside it as `.json`."""
    print(table)
    if out:
        out.write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


# ---- servers on loopback -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server child process on 127.0.0.1:port; ready once `ready_path` answers 200."""

    def __init__(self, cmd: list[str], port: int, ready_path: str, log: Path, timeout: float = 300):
        import urllib.request

        self.port, self.log = port, log
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"server not ready after {timeout} s: {log.read_text()[-2000:]}")
            time.sleep(0.2)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def edgellm_server(export: str, threads: int, ctx: int, log: Path, extra=()) -> ServerProcess:
    port = free_port()
    cmd = [
        sys.executable,
        "-c",
        "from edgellm.cli import main; main()",
        "serve",
        export,
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--ctx",
        str(ctx),
        "--max-queue",
        "64",
        *extra,
    ]
    return ServerProcess(cmd, port, "/health", log)


def model_id(base_url: str) -> str:
    import openai

    return openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=30).models.list().data[0].id


# ---- a tool-capable chat template for SmolLM2 ---------------------------------------------------

# SmolLM2's template plus a Hermes tool section (tools in the system turn, calls as
# <tool_call>{json}</tool_call>, results as <tool_response>), as SmolLM3 / Qwen2.5 write them.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call functions. Their signatures:\n<tools>\n"
    "{% for t in tools %}{{ t.function | tojson }}\n{% endfor %}</tools>\n"
    'Answer a call as <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call><|im_end|>\n'
    "{% elif messages[0]['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}"
    '<tool_call>\n{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n'
    "</tool_call>\n{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Oslo", "Lima"]}, "unit": {"enum": ["C", "F"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time now",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]


def tools_view(export: Path, into: Path) -> Path:
    """A directory with `export`'s files linked and the Hermes tool template as its chat template."""
    view = into / export.resolve().name
    view.mkdir()
    for f in export.iterdir():
        if f.name != "chat_template.jinja":
            (view / f.name).symlink_to(f.resolve())
    (view / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    cfg = view / "tokenizer_config.json"
    if cfg.exists() and "chat_template" in json.loads(cfg.read_text()):
        data = json.loads(cfg.read_text())
        data["chat_template"] = TOOLS_TEMPLATE
        cfg.unlink()
        cfg.write_text(json.dumps(data))
    return view
