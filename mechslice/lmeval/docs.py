"""Document converters the packaged harness task configs call (`process_docs: !function ...`)."""

from __future__ import annotations

import datasets

from mechslice.mc.sources import oe_arc_to_hf, oe_eval_documents


def arc_from_oe_eval(requests: datasets.Dataset) -> datasets.Dataset:
    """The ARC documents of an oe-eval request file in the HF `ai2_arc` fields, as mechslice's scorer reads them."""
    return datasets.Dataset.from_list([oe_arc_to_hf(doc) for doc in oe_eval_documents(requests)])
