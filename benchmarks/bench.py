"""mechslice benchmarks: each figure is measured side by side with its baseline in the same run.

Every measurement runs in a fresh child process so that its peak resident memory is its own. Sizes default to
what two CPU cores finish in minutes; `--full` uses SliceGPT's default calibration (128 x 2048 tokens).
`--repeat N` runs each case N times and keeps its best (the shortest time, the highest throughput), which is
what a timing on a shared or virtual machine can be trusted for. Every process, the plain baselines included,
runs with mechslice's allocator default (PyTorch's huge pages, hooks/allocator.py), so the columns differ only
in the code they run.
Usage: python benchmarks/bench.py [--full] [--only NAME,...] [--repeat N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# importing `hooks` asks for huge pages (hooks/__init__.py); every child process inherits the setting
from hooks.allocator import HUGE_PAGES_ENV

REPEAT = 1  # runs per case (`--repeat`), the best kept


def _child(name: str, kwargs: dict[str, Any], queue: mp.Queue) -> None:
    import torch

    from mechslice.memory import peak_memory_gb

    torch.manual_seed(0)
    result = CASES[name](**kwargs)
    result["peak_rss_gb"] = peak_memory_gb()["cpu"]
    queue.put(result)


def _run_once(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, kwargs, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of several runs of one case (by its time or its throughput), with the largest peak RSS."""
    rates = [key for key in runs[0] if key.endswith("_per_s")]
    if "seconds" in runs[0]:
        best = min(runs, key=lambda r: r["seconds"])
    elif rates:
        best = max(runs, key=lambda r: r[rates[0]])
    else:  # nothing timed (the model-only memory case, the sweep's per-sparsity list): the last run
        best = runs[-1]
    return {**best, "peak_rss_gb": max(r["peak_rss_gb"] for r in runs), "runs": len(runs)}


def measure(name: str, **kwargs: Any) -> dict[str, Any]:
    """Run one case REPEAT times, each in a fresh process; returns the best run's figures and the peak RSS."""
    return _best([_run_once(name, kwargs) for _ in range(REPEAT)])


# ---- cases (each runs in its own process) ----------------------------------------------------------------


# The three columns every throughput figure is reported in: plain `transformers` (its own forward and loss, no
# mechslice code) in float32 and in bfloat16, and mechslice's default (`--dtype auto`: bf16 on AMX/AVX512-BF16).
COLUMNS = {"plain float32": "float32", "plain bfloat16": "bfloat16"}


def _model(dtype: str = "auto") -> Any:
    from mechslice.loading import load_model

    return load_model(device="cpu", dtype=dtype)


def case_load() -> dict[str, Any]:
    from mechslice.loading import load_model

    load_model(device="cpu")  # make sure the cache exists
    start = time.perf_counter()
    load_model(device="cpu")
    return {"seconds": time.perf_counter() - start}


def case_model_only() -> dict[str, Any]:
    _model()
    return {}


def _ppl_windows(lm: Any, tokens: int, seqlen: int) -> Any:
    from mechslice.corpora import corpus_tokens, eval_windows

    return eval_windows(corpus_tokens(lm.tokenizer), seqlen, tokens)


def case_ppl_mechslice(tokens: int, seqlen: int) -> dict[str, Any]:
    from mechslice.perplexity import evaluate_perplexity

    lm = _model()
    r = evaluate_perplexity(lm.model, _ppl_windows(lm, tokens, seqlen), batch_size=4, progress=False)
    return {"tokens_per_s": r.tokens_per_s, "ppl": r.ppl}


def case_ppl_plain(tokens: int, seqlen: int, dtype: str) -> dict[str, Any]:
    import torch

    lm = _model(dtype)
    windows = _ppl_windows(lm, tokens, seqlen)
    start, total, count = time.perf_counter(), 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), 4):
            batch = windows[i : i + 4]
            n = batch[:, 1:].numel()
            total += lm.model(batch, labels=batch).loss.item() * n
            count += n
    return {
        "tokens_per_s": count / (time.perf_counter() - start),
        "ppl": float(torch.tensor(total / count).exp()),
    }


def _calib(lm: Any, samples: int, seqlen: int) -> Any:
    from mechslice.corpora import CALIBRATION_SEED, calibration_windows

    return calibration_windows(lm.tokenizer, "wiki", samples, seqlen, seed=CALIBRATION_SEED)


def case_forward(samples: int, seqlen: int, dtype: str = "bfloat16") -> dict[str, Any]:
    """One plain forward of the base model over the calibration tokens (the yardstick for slicing)."""
    import torch

    lm = _model(dtype)
    calib = _calib(lm, samples, seqlen)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(calib), 8):
            lm.model.model(calib[i : i + 8], use_cache=False)
    return {"seconds": time.perf_counter() - start}


def case_slice(samples: int, seqlen: int, rotation: str) -> dict[str, Any]:
    from mechslice.slicing import slice_model

    lm = _model()
    calib = _calib(lm, samples, seqlen)
    start = time.perf_counter()
    slice_model(lm, 0.25, calib, rotation=rotation, progress=False)
    return {"seconds": time.perf_counter() - start}


def case_prune(samples: int, seqlen: int, method: str) -> dict[str, Any]:
    """One method's pruning at 0.2 of non-embedding parameters (scoring or SliceGPT, then the cut)."""
    from mechslice.pruning import nearest_sparsity, prune

    lm = _model()
    calib = _calib(lm, samples, seqlen)
    match = nearest_sparsity(lm, method, 0.2)
    start = time.perf_counter()
    prune(lm, method, match.sparsity, calib, progress=False, target=match)
    return {"seconds": time.perf_counter() - start}


def case_many_exact(samples: int, seqlen: int, sparsities: list[float]) -> dict[str, Any]:
    from mechslice.slicing import slice_model

    start = time.perf_counter()
    for s in sparsities:
        lm = _model()
        slice_model(lm, s, _calib(lm, samples, seqlen), progress=False)
    return {"seconds": time.perf_counter() - start}


def case_many_shared(samples: int, seqlen: int, sparsities: list[float]) -> dict[str, Any]:
    from mechslice.slicing import Slicer

    lm = _model()
    start = time.perf_counter()
    slicer = Slicer(lm, _calib(lm, samples, seqlen), progress=False)
    for s in sparsities:
        slicer.sliced(s)
    return {"seconds": time.perf_counter() - start}


def _calibration_rank(rank: int, world: int, port: int, samples: int, seqlen: int, queue: mp.Queue) -> None:
    """One rank of a `world`-process calibration (gloo on loopback, one intra-op thread per process)."""
    import torch

    from mechslice import distributed
    from mechslice.memory import peak_memory_gb
    from mechslice.slicing import Slicer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init_from_env()
    lm = _model()
    calib = _calib(lm, samples, seqlen)
    distributed.barrier()
    start = time.perf_counter()
    Slicer(lm, calib, progress=False)
    seconds = time.perf_counter() - start
    queue.put({"rank": rank, "seconds": seconds, "peak_rss_gb": peak_memory_gb()["cpu"]})
    distributed.shutdown()


def case_calibration(samples: int, seqlen: int, processes: int, threads: int = 1) -> dict[str, Any]:
    """Per-layer `Slicer` calibration (one forward pass + every basis) over `processes` ranks."""
    import socket

    if processes == 1:
        import torch

        from mechslice.slicing import Slicer

        torch.set_num_threads(threads)
        lm = _model()
        calib = _calib(lm, samples, seqlen)
        start = time.perf_counter()
        Slicer(lm, calib, progress=False)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "tokens_per_s": samples * seqlen / seconds}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    ranks = [
        ctx.Process(target=_calibration_rank, args=(r, processes, port, samples, seqlen, queue))
        for r in range(processes)
    ]
    for proc in ranks:
        proc.start()
    results = [queue.get() for _ in ranks]
    for proc in ranks:
        proc.join()
    seconds = max(r["seconds"] for r in results)  # the job ends when its slowest rank does
    return {
        "seconds": seconds,
        "tokens_per_s": samples * seqlen / seconds,
        "rank_peak_rss_gb": max(r["peak_rss_gb"] for r in results),
    }


def case_trace(tokens: int) -> dict[str, Any]:
    from hooks.flow import trace_tokens
    from mechslice.corpora import corpus_tokens

    lm = _model()
    ids = corpus_tokens(lm.tokenizer)
    bridge = lm.bridge
    start = time.perf_counter()
    trace_tokens(bridge, ids, tokens, seqlen=512)
    return {"seconds": time.perf_counter() - start}


def case_bridge_forward(tokens: int) -> dict[str, Any]:
    """A plain TransformerBridge forward over the tokens a trace reads, in mechslice's default dtype."""
    import torch

    from mechslice.corpora import corpus_tokens

    lm = _model()
    ids = corpus_tokens(lm.tokenizer)[:tokens].view(-1, 512)
    bridge = lm.bridge
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(ids), 4):
            bridge(ids[i : i + 4])
    return {"seconds": time.perf_counter() - start}


def case_mc(items: int, batched: bool, dtype: str = "auto") -> dict[str, Any]:
    """mechslice's batched scorer, or a plain loop (one forward per option) with transformers' own forward."""
    import torch

    from mechslice.mc import evaluate_mc
    from mechslice.mc.scoring import encode_request
    from mechslice.mc.tasks import load_task

    lm = _model(dtype)
    if batched:
        r = evaluate_mc(lm.model, lm.tokenizer, "arc_easy", limit=items, progress=False)
        return {"items_per_s": r.items_per_s, "acc": r.acc}
    task_items = load_task("arc_easy", limit=items)
    start, hits = time.perf_counter(), 0
    with torch.no_grad():
        for item in task_items:
            scores = []
            for context, continuation in item.requests():
                ctx, cont = encode_request(lm.tokenizer, context, continuation)
                ids = torch.tensor([ctx + cont])
                logp = torch.log_softmax(lm.model(ids).logits[0, len(ctx) - 1 : -1].float(), -1)
                scores.append(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item())
            hits += int(max(range(len(scores)), key=scores.__getitem__) == item.gold)
    return {"items_per_s": len(task_items) / (time.perf_counter() - start), "acc": hits / len(task_items)}


def case_sweep(sparsities: list[float]) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    from analyses.sweep import QUICK, run_sweep, settings_from

    settings = settings_from(QUICK, sparsities=tuple(sparsities))
    with tempfile.TemporaryDirectory() as tmp:
        results = run_sweep(settings, Path(tmp), progress=False, log=lambda _: None)
    totals = [r["seconds"]["total"] for r in results["records"]]
    return {"seconds_per_sparsity": totals}


CASES: dict[str, Callable[..., dict[str, Any]]] = {
    name[len("case_") :]: fn for name, fn in globals().items() if name.startswith("case_")
}


# ---- sections (each prints its figures side by side) -------------------------------------------------------


def section_load(full: bool) -> dict[str, Any]:
    r = measure("load")
    print(f"load (cached float copy): {r['seconds']:.2f} s (target < 2 s)")
    return r


def _columns(rate: str, unit: str, plain: dict[str, dict[str, Any]], ours: dict[str, Any]) -> str:
    """One line of the side-by-side table: each plain column, mechslice's default, and its ratio to each."""
    cells = [f"{name} {r[rate]:.2f} {unit}" for name, r in plain.items()]
    ratios = [f"{ours[rate] / r[rate]:.2f}x {name}" for name, r in plain.items()]
    return f"{' | '.join(cells)} | mechslice default {ours[rate]:.2f} {unit} -> {', '.join(ratios)}"


def _values(key: str, plain: dict[str, dict[str, Any]]) -> str:
    return ", ".join(f"{r[key]:.3f}" for r in plain.values())


def _load_note() -> str:
    return f"load average {os.getloadavg()[0]:.2f}"


def section_ppl(full: bool) -> dict[str, Any]:
    kw = {"tokens": 16384 if full else 8192, "seqlen": 2048}
    plain = {name: measure("ppl_plain", dtype=dtype, **kw) for name, dtype in COLUMNS.items()}
    ours = measure("ppl_mechslice", **kw)
    print(
        f"perplexity throughput ({kw['tokens']} tokens, windows of {kw['seqlen']}): "
        f"{_columns('tokens_per_s', 'tok/s', plain, ours)} (targets: >= 1x plain bf16, >= 3.5x plain fp32); "
        f"ppl {_values('ppl', plain)}, mechslice {ours['ppl']:.3f}; {_load_note()}"
    )
    return {"ours": ours, "plain": plain}


def section_slice(full: bool) -> dict[str, Any]:
    kw = {"samples": 128, "seqlen": 2048} if full else {"samples": 16, "seqlen": 1024}
    base = measure("model_only")
    fwd = measure("forward", **kw)
    out: dict[str, Any] = {"calibration": kw, "forward": fwd, "model_rss_gb": base["peak_rss_gb"]}
    for rotation in ("per-layer", "global"):
        r = measure("slice", rotation=rotation, **kw)
        out[rotation] = r
        print(
            f"slicing {rotation} at {kw['samples']}x{kw['seqlen']} (mechslice default dtype): {r['seconds']:.1f} s "
            f"vs one plain bf16 forward {fwd['seconds']:.1f} s -> {r['seconds'] / fwd['seconds']:.2f}x "
            f"(target < 1.5x); peak RSS {r['peak_rss_gb']:.2f} GB (model alone {base['peak_rss_gb']:.2f} GB; "
            f"target < 2 GB at 128x2048); {_load_note()}"
        )
    sparsities = [0.1, 0.2, 0.3, 0.4]
    small = {"samples": 8, "seqlen": 512}
    exact = measure("many_exact", sparsities=sparsities, **small)
    shared = measure("many_shared", sparsities=sparsities, **small)
    print(
        f"{len(sparsities)} sparsities at {small['samples']}x{small['seqlen']}: shared rotation "
        f"{shared['seconds']:.1f} s vs exact per sparsity {exact['seconds']:.1f} s -> "
        f"{exact['seconds'] / shared['seconds']:.2f}x faster"
    )
    out.update(many_exact=exact, many_shared=shared)
    return out


def section_prune(full: bool) -> dict[str, Any]:
    from mechslice.pruning import METHODS

    kw = {"samples": 128, "seqlen": 2048} if full else {"samples": 16, "seqlen": 1024}
    fwd = measure("forward", dtype="auto", **kw)
    out: dict[str, Any] = {"calibration": kw, "forward": fwd}
    for method in METHODS:
        r = out[method] = measure("prune", method=method, **kw)
        print(
            f"pruning {method} to 0.2 of non-embedding parameters at {kw['samples']}x{kw['seqlen']}: "
            f"{r['seconds']:.1f} s vs one forward over the same tokens {fwd['seconds']:.1f} s -> "
            f"{r['seconds'] / fwd['seconds']:.2f}x; peak RSS {r['peak_rss_gb']:.2f} GB; {_load_note()}"
        )
    return out


def section_calibration(full: bool) -> dict[str, Any]:
    kw = {"samples": 128, "seqlen": 2048} if full else {"samples": 8, "seqlen": 1024}
    single = measure("calibration", processes=1, threads=1, **kw)
    threaded = measure("calibration", processes=1, threads=2, **kw)
    two = measure("calibration", processes=2, **kw)
    print(
        f"calibration throughput at {kw['samples']}x{kw['seqlen']} (Slicer, per-layer bases): 1 process x 1 "
        f"thread {single['tokens_per_s']:.0f} tok/s, 1 process x 2 threads {threaded['tokens_per_s']:.0f} "
        f"tok/s, 2 processes x 1 thread (gloo) {two['tokens_per_s']:.0f} tok/s -> "
        f"{two['tokens_per_s'] / single['tokens_per_s']:.2f}x and {two['tokens_per_s'] / threaded['tokens_per_s']:.2f}x; "
        f"peak RSS {single['peak_rss_gb']:.2f} GB vs {two['rank_peak_rss_gb']:.2f} GB per rank; load average "
        f"{os.getloadavg()[0]:.1f}.\n"
        "  What limits the scaling here: two cores (shared with whatever else runs) cap two ranks at 2x one "
        "single-threaded process, and a two-thread process already uses the same two cores, so ranks gain over "
        "it only where its threads idle (small matmuls, the serial eigh of each basis) or stall (two "
        "spinning threads on a busy machine); on a shared machine two processes also win a larger share of the "
        "cores than one, so read the ratios with the load average; each rank also holds its own model copy."
    )
    return {"calibration": kw, "one_thread": single, "two_threads": threaded, "two_processes": two}


def section_trace(full: bool) -> dict[str, Any]:
    tokens = 8192
    base, fwd, tr = (
        measure("model_only"),
        measure("bridge_forward", tokens=tokens),
        measure("trace", tokens=tokens),
    )
    print(
        f"tracing {tokens} tokens (all stages, all layers): {tr['seconds']:.1f} s vs a plain bridge forward "
        f"{fwd['seconds']:.1f} s -> {tr['seconds'] / fwd['seconds']:.2f}x (target <= 1.3x; both in mechslice's default dtype); peak RSS "
        f"{tr['peak_rss_gb']:.2f} GB, {tr['peak_rss_gb'] - base['peak_rss_gb']:.2f} GB above the model alone "
        f"(target < 2 GB); {_load_note()}"
    )
    return {"forward": fwd, "trace": tr, "model_rss_gb": base["peak_rss_gb"]}


def section_mc(full: bool) -> dict[str, Any]:
    items = 200 if full else 50
    plain = {name: measure("mc", items=items, batched=False, dtype=dtype) for name, dtype in COLUMNS.items()}
    ours = measure("mc", items=items, batched=True)
    print(
        f"multiple choice ({items} ARC-Easy items; plain = one transformers forward per option): "
        f"{_columns('items_per_s', 'items/s', plain, ours)}; acc "
        f"{_values('acc', plain)}, mechslice {ours['acc']:.3f}; {_load_note()}"
    )
    return {"ours": ours, "plain": plain}


def section_sweep(full: bool) -> dict[str, Any]:
    r = measure("sweep", sparsities=[0.0, 0.2, 0.4])
    per = ", ".join(f"{s:.0f} s" for s in r["seconds_per_sparsity"])
    print(f"quick sweep wall time per sparsity (s = 0, 0.2, 0.4): {per}")
    return r


SECTIONS: dict[str, Callable[[bool], dict[str, Any]]] = {
    name[len("section_") :]: fn for name, fn in globals().items() if name.startswith("section_")
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="SliceGPT's default calibration (slow: ~1 h)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--json", default=None, help="also write all figures to this JSON file")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case, the best kept (default 1)")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [c for c in chosen if c not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print(f"error: --repeat must be at least 1, got {args.repeat}", file=sys.stderr)
        return 2
    global REPEAT
    REPEAT = args.repeat
    print(
        f"best of {REPEAT} run(s) per case; PyTorch huge pages "
        f"{'on' if os.environ.get(HUGE_PAGES_ENV) == '1' else 'off'} in every process; start {_load_note()}"
    )
    figures = {name: SECTIONS[name](args.full) for name in chosen}
    if args.json:
        from mechslice.atomic import atomic_write_json

        atomic_write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
