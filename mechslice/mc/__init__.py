"""Zero-shot evaluation for Proposition 3: multiple choice (ARC-e/c, WinoGrande, PIQA, HellaSwag, SciQ, OpenBookQA,
Social IQa, COPA) and LAMBADA's last word."""

from mechslice.mc.scoring import MCResult, evaluate_mc, score_items
from mechslice.mc.tasks import DEFAULT_SPLITS, TASKS, MCItem, load_task

__all__ = ["DEFAULT_SPLITS", "TASKS", "MCItem", "MCResult", "evaluate_mc", "load_task", "score_items"]
