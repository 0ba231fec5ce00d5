"""The harness model over a mechslice `LoadedModel`: lm-eval's requests, mechslice's batched scorer.

Importing this module imports lm_eval; `mechslice.lmeval` does so only when the harness is asked for.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.mc.scoring import Encoded, continuation_logprobs, start_token


class MechsliceLM(TemplateLM):
    """Log-likelihood and rolling log-likelihood requests scored by `continuation_logprobs`.

    The harness's `TemplateLM` splits each (context, continuation) into token ids (the split mechslice's
    `encode_request` reproduces); only the forward passes are ours, so any model `load_model` reads (sliced
    folders with shortcut matrices included) is scored. Generation is refused.
    """

    def __init__(self, loaded: LoadedModel, batch_size: int = 16, progress: bool = True) -> None:
        super().__init__()
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.batch_size = batch_size
        self.progress = progress

    @property
    def eot_token_id(self) -> int:
        """The end-of-text token."""
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes: BOS, else EOS, as in mechslice's scorer."""
        return start_token(self.tokenizer)

    @property
    def max_length(self) -> int:
        """The model's positions: the window of rolling log-likelihood."""
        return self.loaded.model.config.max_position_embeddings

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of `string`, without special tokens unless asked (the harness's causal-LM default)."""
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def _score(self, requests: list[Encoded], disable_tqdm: bool) -> tuple[list[float], list[bool]]:
        """Summed log-probs and greedy flags of token-id requests, with a progress bar on stderr."""
        with tqdm(total=len(requests), desc="requests", disable=disable_tqdm or not self.progress) as bar:
            scores, greedy = continuation_logprobs(
                self.loaded.model, requests, self.batch_size, bar, [1.0] * len(requests)
            )
        return scores.tolist(), greedy.tolist()

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) of each encoded request."""
        scores, greedy = self._score(
            [(context, continuation) for _, context, continuation in requests], disable_tqdm
        )
        return list(zip(scores, greedy, strict=True))

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """log P(text) of each request's text, scored in disjoint windows of the model's length (as HFLM does)."""
        windows: list[Encoded] = []
        owner: list[int] = []
        for index, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owner.append(index)
        scores, _ = self._score(windows, disable_tqdm)
        totals = torch.zeros(len(requests), dtype=torch.float64)
        totals.index_add_(0, torch.tensor(owner, dtype=torch.long), torch.tensor(scores, dtype=torch.float64))
        return totals.tolist()

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Refused: mechslice scores log-likelihoods and does not generate text."""
        task = next((request.task_name for request in requests if request.task_name), "?")
        raise MechsliceError(
            f"task '{task}' needs text generation (generate_until), which mechslice lm-eval does not run; "
            "choose a multiple-choice or log-likelihood task"
        )
