"""Text data for calibration and evaluation.

`--data` takes a text file, a JSONL file (the "text" field), a folder of .txt/.md files, or a
Hugging Face dataset name when online (needs `datasets`). Offline default: the Python
documentation text that ships with every CPython (`pydoc_data.topics`).

Split (fixed, so calibration never sees evaluation text): the token stream's last 10% is the
evaluation split, the first 90% the calibration/training split.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from .errors import EdgeLLMError
from .progress import EdgeLLMWarning

EVAL_FRACTION = 0.1
BUILTIN = "builtin:pydoc"


def builtin_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def load_text(data: str | None) -> str:
    """All text of a data spec, concatenated with blank lines between documents."""
    if data is None or data == BUILTIN:
        return builtin_text()
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise EdgeLLMError(f"data folder '{data}' has no .txt or .md files")
        text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    elif path.suffix == ".jsonl" and path.is_file():
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise EdgeLLMError(f"'{data}' line {i} is not valid JSON") from None
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                docs.append(obj["text"])
            elif isinstance(obj, str):
                docs.append(obj)
            else:
                raise EdgeLLMError(f"'{data}' line {i} has no string field \"text\"")
        text = "\n\n".join(docs)
    elif path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix or "/" not in data:
        raise EdgeLLMError(
            f"data '{data}' does not exist (expected a text/JSONL file, a folder, or a dataset name like "
            "'wikitext/wikitext-2-raw-v1')"
        )
    else:
        text = _hf_dataset_text(data)
    if not text.strip():
        raise EdgeLLMError(f"data '{data}' is empty; give a file with text in it")
    return text


def _hf_dataset_text(name: str) -> str:
    try:
        import datasets
    except ImportError:
        from ._deps import install_hint

        raise EdgeLLMError(
            f"'{name}' is not a local path; a Hugging Face dataset needs 'datasets': {install_hint('datasets')}"
        ) from None
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split="train")
    except Exception as exc:
        raise EdgeLLMError(f"cannot load dataset '{name}' ({type(exc).__name__}); pass a local file instead") from None
    col = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(t for t in ds[col] if isinstance(t, str))


def token_ids(tokenizer, text: str):
    """The whole text as one 1-D LongTensor of token ids."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def split_tokens(ids, split: str):
    """'calib' (first 90%) or 'eval' (last 10%) of a token stream."""
    cut = int(len(ids) * (1 - EVAL_FRACTION))
    if split == "eval":
        return ids[cut:]
    if split == "calib":
        return ids[:cut]
    if split == "all":
        return ids
    raise ValueError(f"unknown split {split!r}")


def calibration_batch(ids, n_samples: int, seq_len: int, seed: int = 0):
    """`n_samples` windows of `seq_len` tokens from the calibration split -> (n, seq_len).

    Windows are non-overlapping where the data allows; fewer are returned (with a warning) when
    the data is too small for what was asked.
    """
    import torch

    ids = split_tokens(ids, "calib")
    if len(ids) < seq_len:
        if len(ids) < 16:
            raise EdgeLLMError(
                f"the data has only {len(ids)} calibration tokens; give more text (at least a few thousand tokens)"
            )
        warnings.warn(
            f"calibration data has {len(ids)} tokens, shorter than --seq-len {seq_len}; using {len(ids)}",
            EdgeLLMWarning,
        )
        seq_len = len(ids)
    n_windows = len(ids) // seq_len
    if n_windows < n_samples:
        warnings.warn(
            f"calibration data holds only {n_windows} windows of {seq_len} tokens (asked for {n_samples}); "
            "quality may suffer: give more data with --data",
            EdgeLLMWarning,
        )
        n_samples = n_windows
    g = torch.Generator().manual_seed(seed)
    starts = torch.randperm(n_windows, generator=g)[:n_samples].sort().values * seq_len
    if n_samples < 16:
        warnings.warn(f"only {n_samples} calibration samples; 32 or more are recommended", EdgeLLMWarning)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
