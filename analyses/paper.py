"""The paper's numbers and names that our results are set beside: its laws, its Table 3 (Appendix A.2), the two
models and the datasets it fitted them on, keyed by our task names."""

from __future__ import annotations

from dataclasses import dataclass

from analyses.results import PPL

# The two laws as the paper states them, by metric.
LAWS = {"perplexity": "y = ln PPL0 / ln PPL (Prop. 2)", "accuracy": "y = ln(acc / acc0) (Prop. 3)"}


@dataclass(frozen=True)
class PaperFit:
    """One cell group of the paper's Table 3: the fitted a, b and the RMSE of the fit."""

    a: float
    b: float
    rmse: float


# The paper's models: the slugs name fits.csv's columns, the short names the report's.
PAPER_MODELS = {"Llama-3-8B-Instruct": "llama3_8b", "Phi-3-mini-4k-Instruct": "phi3_mini"}
PAPER_SHORT = {"Llama-3-8B-Instruct": "Llama-3", "Phi-3-mini-4k-Instruct": "Phi-3"}
PAPER_DATASETS = {
    PPL: "WikiText2",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "winogrande": "WinoGrande",
    "piqa": "PIQA",
}
PAPER_TABLE3: dict[str, dict[str, PaperFit]] = {
    PPL: {
        "Llama-3-8B-Instruct": PaperFit(-1.08, 0.96, 0.03),
        "Phi-3-mini-4k-Instruct": PaperFit(-0.90, 1.02, 0.01),
    },
    "arc_easy": {
        "Llama-3-8B-Instruct": PaperFit(-2.14, 0.04, 0.05),
        "Phi-3-mini-4k-Instruct": PaperFit(-1.84, 0.04, 0.04),
    },
    "arc_challenge": {
        "Llama-3-8B-Instruct": PaperFit(-2.02, -0.07, 0.09),
        "Phi-3-mini-4k-Instruct": PaperFit(-1.88, -0.01, 0.02),
    },
    "winogrande": {
        "Llama-3-8B-Instruct": PaperFit(-0.86, -0.02, 0.02),
        "Phi-3-mini-4k-Instruct": PaperFit(-0.66, -0.02, 0.02),
    },
    "piqa": {
        "Llama-3-8B-Instruct": PaperFit(-0.91, -0.01, 0.03),
        "Phi-3-mini-4k-Instruct": PaperFit(-0.90, 0.01, 0.01),
    },
}
