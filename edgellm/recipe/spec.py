"""Recipe files: plain YAML, read and checked whole before any work starts (docs/RECIPES.md).

    model: builtin:smollm2        # the input (edgellm compress --model overrides it)
    data: notes.txt               # optional: --data for every stage that takes it
    report: {eval-tokens: 4096}   # optional: what the final report measures
    stages:                       # run in order; each is one edgellm command with its options
      - prune: {structured: layers, ratio: 0.2}
      - distill: {steps: 200, lr: 1.0e-4}
      - name: q4                  # optional stage name (default: the command); OUT/NN-name/
        quantize: {bits: 4, method: gptq}
      - export: {}
      - bench: {target: rpi5, with: [other-export/]}

Every problem is collected (unknown stage, unknown or ill-typed option, impossible order) and
reported together, each naming its stage and key.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EdgeLLMError
from . import stages as C

TOP_KEYS = {"model", "data", "report", "stages", "description"}
# What the report measures for every stage's output (all optional in `report:`).
REPORT_DEFAULTS = {
    "eval-tokens": 4096,
    "ctx": 512,
    "speed": True,
    "prompt-tokens": 64,
    "gen-tokens": 32,
    "reps": 3,
    "threads": 0,
}
MODEL_STAGES = ("prune", "distill", "draft", "quantize", "export")  # stages whose output is the next stage's input
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")


@dataclass
class Stage:
    index: int
    name: str
    command: str
    options: dict  # Python parameter name -> converted value (only the keys the recipe sets)
    keys: dict  # the same, by the key as written in the recipe (for the lock file and messages)
    extra: dict = field(default_factory=dict)  # recipe-level keys of the stage (bench: with)

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}-{self.name}"


@dataclass
class Recipe:
    path: Path | None
    model: str
    data: str | None
    report: dict
    stages: list[Stage]
    description: str = ""


def _loader():
    """SafeLoader whose scalars follow YAML 1.2: `2:4` is a string (not 124 in base 60), `on` is not true."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        k: [
            (tag, rx)
            for tag, rx in v
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")
        ]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9][0-9_]*$"), list("-+0123456789"))
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        list("-+0123456789."),
    )
    return Loader


def read_yaml(path: Path):
    """The recipe file parsed (plain data), or an EdgeLLMError saying where the YAML is broken."""
    from .._deps import require

    yaml = require("yaml")
    path = Path(path)
    if not path.is_file():
        raise EdgeLLMError(f"recipe '{path}' does not exist" if not path.exists() else f"recipe '{path}' is not a file")
    try:
        return yaml.load(path.read_text(), Loader=_loader())  # noqa: S506 (a SafeLoader subclass)
    except UnicodeDecodeError:
        raise EdgeLLMError(f"recipe '{path}' is not a text file") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise EdgeLLMError(f"recipe '{path}' is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None


def parse(doc, path: Path | None = None, model: str | None = None) -> Recipe:
    """Check a parsed recipe whole; raise one EdgeLLMError listing every problem."""
    errors: list[str] = []
    if not isinstance(doc, dict):
        raise EdgeLLMError(f"recipe '{path}': expected a mapping with 'model' and 'stages', got {type(doc).__name__}")
    for key in doc:
        if key not in TOP_KEYS:
            errors.append(f"top level: unknown key '{key}' (keys: {', '.join(sorted(TOP_KEYS))})")
    model = model or doc.get("model")
    if not model:
        errors.append("top level: 'model' is missing (or pass --model)")
    elif not isinstance(model, str):
        errors.append(f"top level: 'model' must be a path or a model id, not {model!r}")
    data = doc.get("data")
    if data is not None and not isinstance(data, str):
        errors.append(f"top level: 'data' must be a path or a dataset name, not {data!r}")
    report = _report(doc.get("report"), errors)
    stages = _stages(doc.get("stages"), data, errors)
    if isinstance(model, str) and model:
        _check_order(stages, _input_quantized(model), errors)
    if errors:
        n = len(errors)
        raise EdgeLLMError(
            f"recipe '{path}' has {n} problem{'s' if n > 1 else ''}; nothing was run:\n  - " + "\n  - ".join(errors)
        )
    return Recipe(
        path=path, model=model, data=data, report=report, stages=stages, description=str(doc.get("description") or "")
    )


def read_recipe(path: Path, model: str | None = None) -> Recipe:
    return parse(read_yaml(path), Path(path), model)


def _report(section, errors: list[str]) -> dict:
    out = dict(REPORT_DEFAULTS)
    if section is None:
        return out
    if not isinstance(section, dict):
        errors.append(f"report: expected a mapping of {', '.join(REPORT_DEFAULTS)}")
        return out
    for key, value in section.items():
        k = str(key).replace("_", "-")
        if k not in REPORT_DEFAULTS:
            errors.append(f"report: unknown key '{key}' (keys: {', '.join(REPORT_DEFAULTS)})")
        elif isinstance(REPORT_DEFAULTS[k], bool) != isinstance(value, bool) or not isinstance(value, int):
            errors.append(
                f"report: '{key}' must be {'true or false' if isinstance(REPORT_DEFAULTS[k], bool) else 'an integer'} "
                f"(got {value!r})"
            )
        elif not isinstance(value, bool) and value < (0 if k == "threads" else 1):
            errors.append(f"report: '{key}' must be >= {0 if k == 'threads' else 1} (got {value})")
        else:
            out[k] = value
    return out


def _stages(items, data: str | None, errors: list[str]) -> list[Stage]:
    if not isinstance(items, list) or not items:
        errors.append(
            "top level: 'stages' must be a non-empty list, e.g. stages: [{quantize: {bits: 4}}, {export: {}}]"
        )
        return []
    stages, names = [], set()
    for i, item in enumerate(items):
        where = f"stage {i + 1}"
        if not isinstance(item, dict):
            errors.append(f"{where}: expected a mapping like '- quantize: {{bits: 4}}', got {item!r}")
            continue
        cmds = [k for k in item if k in C.COMMANDS]
        others = [k for k in item if k not in C.COMMANDS and k != "name"]
        for k in others:
            close = difflib.get_close_matches(str(k), list(C.COMMANDS), n=1)
            errors.append(
                f"{where}: unknown stage '{k}'"
                + (f"; did you mean '{close[0]}'?" if close else f" (stages: {', '.join(C.COMMANDS)})")
            )
        if len(cmds) != 1:
            if not others:
                errors.append(
                    f"{where}: give exactly one command ({', '.join(C.COMMANDS)}), got "
                    f"{', '.join(map(str, cmds)) or 'none'}"
                )
            continue
        cmd = cmds[0]
        name = item.get("name", cmd)
        where = f"stage {i + 1} ({name})"
        if not isinstance(name, str) or not NAME_RE.match(name):
            errors.append(f"{where}: 'name' must be letters, digits, '-', '_' or '.' (got {name!r})")
            name = cmd
        if name in names:
            errors.append(f"{where}: the name '{name}' is used by an earlier stage; give this one a 'name:'")
        names.add(name)
        body = item[cmd]
        if body is None:
            body = {}
        if not isinstance(body, dict):
            errors.append(f"{where}: options must be a mapping (e.g. '{cmd}: {{...}}' or '{cmd}: {{}}'), got {body!r}")
            body = {}
        opts, keys, extra = {}, {}, {}
        for key, value in body.items():
            key = str(key)
            if key in C.RECIPE_KEYS.get(cmd, {}):
                if key == "with" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                    errors.append(f"{where}: 'with' must be a list of variants (VARIANT[:BACKEND]), got {value!r}")
                else:
                    extra[key] = value
                continue
            try:
                pname, converted = C.convert(cmd, key, value)
            except ValueError as exc:
                errors.append(f"{where}: {exc}")
                continue
            if pname in opts:
                errors.append(f"{where}: '{key}' repeats an option already given")
            opts[pname], keys[key] = converted, value
        if data is not None and "data" in C.options(cmd) and "data" not in opts:
            opts["data"], keys["data"] = data, data
        stages.append(Stage(index=i, name=name, command=cmd, options=opts, keys=keys, extra=extra))
    return stages


def _input_quantized(model: str) -> bool:
    import json

    rec = Path(model) / "edgellm.json"
    try:
        return bool(rec.is_file() and json.loads(rec.read_text()).get("quantization"))
    except (OSError, ValueError):
        return False


def _check_order(stages: list[Stage], quantized: bool, errors: list[str]) -> None:
    """Refuse orders no model can go through: anything that rewrites weights after quantize or export."""
    exported_at = quantized_at = None
    if quantized:
        quantized_at = "the input model"
    first_model_stage, sparse_at = True, None
    input_quantized = quantized
    for s in stages:
        where = f"stage {s.index + 1} ({s.name})"
        if s.command == "draft":  # a second chain: the draft, made from the input model, then its own stages
            if input_quantized:
                errors.append(f"{where}: 'draft' needs the unquantized target as the recipe's model")
            exported_at = quantized_at = sparse_at = None
            first_model_stage = False
            continue
        if s.command in ("prune", "distill", "quantize") and exported_at:
            errors.append(
                f"{where}: '{s.command}' after export ({exported_at}): export comes after every stage that changes the "
                "weights"
            )
        elif s.command in ("prune", "distill") and quantized_at:
            errors.append(
                f"{where}: '{s.command}' after quantize ({quantized_at}): {s.command} the unquantized model, quantize "
                "last"
            )
        elif s.command == "quantize" and quantized_at:
            errors.append(f"{where}: 'quantize' twice ({quantized_at} is already quantized)")
        if s.command == "export" and exported_at:
            errors.append(f"{where}: 'export' twice (already exported at {exported_at})")
        if s.command == "distill" and "student_layers" in s.options and not first_model_stage:
            errors.append(
                f"{where}: 'student-layers' makes the student from the teacher's layers, but this distill "
                "stage starts from the previous stage's output; drop it, or make distill the first stage"
            )
        if s.command == "distill" and sparse_at:
            errors.append(
                f"{where}: 'distill' after an unstructured / N:M prune ({sparse_at}) would train the pruned "
                "zeros back to non-zero values; distill first, then prune with 'method', or prune with 'structured'"
            )
        if s.command == "prune" and "method" in s.options:
            sparse_at = where
        if s.command == "quantize" and not quantized_at:
            quantized_at = where
        if s.command == "export" and not exported_at:
            exported_at = where
        if s.command in MODEL_STAGES:
            first_model_stage = False
