"""Zero-shot multiple-choice evaluation (ARC-e, ARC-c, WinoGrande, PIQA, HellaSwag) for Proposition 3."""

from mechslice.mc.scoring import MCResult, evaluate_mc, score_items
from mechslice.mc.tasks import DEFAULT_SPLITS, TASKS, MCItem, load_task

__all__ = ["DEFAULT_SPLITS", "TASKS", "MCItem", "MCResult", "evaluate_mc", "load_task", "score_items"]
