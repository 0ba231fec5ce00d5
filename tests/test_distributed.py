"""Sharded calibration and evaluation under torchrun (2 CPU processes, gloo on 127.0.0.1), and device maps.

The distributed test launches this file as a torchrun script (`_worker` below): both ranks slice the same tiny
random Llama on a seeded calibration, evaluate perplexity and multiple choice, and run the `slice` command;
each rank saves what it got, and the test compares that with the same calls in one process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from mechslice import distributed
from mechslice.errors import MechsliceError
from mechslice.loaded import LoadedModel
from mechslice.loading import load_model
from tests.conftest import randomize_norms, tiny_llama_config

VOCAB = 49152  # the embedded tokenizer's, so real text (the MC items, the calibration corpus) fits the model
CALIB_SEED, IDS_SEED, EVAL_SEED = 1, 2, 3
MC_ITEMS = 12

# ---- tolerances ------------------------------------------------------------------------------------------
# Every model here is loaded in float32 (not the `auto` default, bfloat16 on a machine with bf16 units): the
# tolerances below are float32's.
# Both ranks' batches are the single process's batches (batch size divides each rank's share), so the float32
# activations are identical and the float64 second moments differ only in summation order (~1e-16 relative).
# In per-layer mode each basis then shapes the next layer's fp32 input, where a 1e-16 change in Q can flip the
# last bit of an fp32 activation (~6e-8 relative); through eigh (eigengaps of this random model ~1e-2 of the
# spectrum) that is ~1e-5 in Q at worst. So Q within 1e-5 (a wrong reduction, a missed shard or a double count
# moves Q by O(0.1)), eigenvalues within 1e-6 relative, and fp32 logits of O(1) within 1e-4 (as test_slicing).
Q_ATOL, SPECTRUM_RTOL, LOGITS_ATOL = 1e-5, 1e-6, 1e-4
# Perplexity sums fp32 NLLs of identical batches in float64: only the order of the rank sum differs.
NLL_RTOL = 1e-12


def _ids(n: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _tiny_folder(folder: Path) -> Path:
    """A seeded random tiny Llama (non-trivial norm weights) with the embedded tokenizer, saved as a folder."""
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=VOCAB, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    randomize_norms(model)
    model.save_pretrained(folder)
    load_model(device="cpu").tokenizer.save_pretrained(folder)
    return folder


def _corpus(path: Path) -> Path:
    """A small text corpus for the `slice` command's calibration (its train split: all but the last 10%)."""
    words = ["the", "residual", "stream", "of", "a", "transformer", "carries", "every", "layer", "output"]
    paragraphs = [" ".join(words[(i + j) % len(words)] for j in range(60)) for i in range(20)]
    path.write_text("\n\n".join(paragraphs))
    return path


def _slice_cli(folder: Path, corpus: Path, out: Path) -> list[str]:
    return [
        "slice",
        "--model",
        str(folder),
        "--device",
        "cpu",
        "--sparsity",
        "0.25",
        "--calib-corpus",
        f"text:{corpus}",
        "--calib-samples",
        "4",
        "--calib-seqlen",
        "32",
        "--dtype",
        "float32",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--json",
    ]


@torch.no_grad()
def _everything(folder: Path, corpus: Path, out: Path) -> dict[str, object]:
    """What both the single process and every rank compute: bases, sliced logits, perplexity, MC, the CLI."""
    from mechslice.cli import main
    from mechslice.mc import evaluate_mc
    from mechslice.perplexity import evaluate_perplexity
    from mechslice.slicing import Slicer, slice_model

    calib, ids = _ids(8, 32, CALIB_SEED), _ids(2, 16, IDS_SEED)
    found: dict[str, object] = {}
    slicer = Slicer(
        load_model(str(folder), device="cpu", dtype=torch.float32), calib, batch_size=4, progress=False
    )
    found["q"] = torch.stack([*slicer.q_pre, *slicer.q_mid])
    found["slicer_spectra"] = slicer.spectra
    for rotation in ("per-layer", "global"):
        lm = load_model(str(folder), device="cpu", dtype=torch.float32)
        record = slice_model(lm, 0.25, calib, rotation, batch_size=4, progress=False)
        found[f"{rotation}_logits"] = lm.model(ids).logits
        found[f"{rotation}_spectra"] = record.spectra
        found[f"{rotation}_tokens"] = record.calibration["tokens"]
    dense = load_model(str(folder), device="cpu", dtype=torch.float32)
    ppl = evaluate_perplexity(dense.model, _ids(6, 32, EVAL_SEED), batch_size=1, progress=False)
    found["ppl"] = {"tokens": ppl.tokens, "nll": ppl.nll}  # plain types: rank files load with weights_only
    mc = evaluate_mc(dense.model, dense.tokenizer, "arc_easy", limit=MC_ITEMS, progress=False)
    found["mc"] = (mc.n, mc.acc, mc.acc_norm)
    found["cli_rc"] = main(_slice_cli(folder, corpus, out))
    found["cli_logits"] = load_model(str(out), device="cpu", dtype=torch.float32).model(ids).logits
    try:  # one window for two ranks (32 tokens < d: the few-tokens warning is expected, not the point here)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            slice_model(
                load_model(str(folder), device="cpu", dtype=torch.float32), 0.25, calib[:1], progress=False
            )
        found["one_window_error"] = None
    except MechsliceError as err:
        found["one_window_error"] = str(err)
    return found


def _worker(folder: str, corpus: str, out: str, results: str) -> None:
    """One torchrun rank: join the group from the environment, compute everything, save this rank's view."""
    assert distributed.init_from_env()
    found = _everything(Path(folder), Path(corpus), Path(out))
    found.update(
        rank=distributed.rank(), world_size=distributed.world_size(), shard=list(distributed.shard(range(8)))
    )
    torch.save(found, Path(results) / f"rank{distributed.rank()}.pt")
    distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _aligned(q: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`q` with each eigenvector's sign matched to `reference`'s (eigenvectors are defined up to sign)."""
    return q * torch.sign((q * reference).sum(dim=-2, keepdim=True))


def test_two_gloo_processes_match_one_process(tmp_path):
    folder, corpus = _tiny_folder(tmp_path / "tiny"), _corpus(tmp_path / "corpus.txt")
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    command += ["--master-port", str(_free_port()), __file__]
    command += [str(folder), str(corpus), str(tmp_path / "dist_out"), str(ranks)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    views = [torch.load(ranks / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _everything(folder, corpus, tmp_path / "single_out")

    assert [v["world_size"] for v in views] == [2, 2]
    assert [list(v["shard"]) for v in views] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for view in views:
        torch.testing.assert_close(_aligned(view["q"], single["q"]), single["q"], atol=Q_ATOL, rtol=0)
        for key in ("slicer_spectra", "per-layer_spectra", "global_spectra"):
            for name, values in single[key].items():
                assert view[key][name] == pytest.approx(values, rel=SPECTRUM_RTOL)
        for key in ("per-layer_logits", "global_logits", "cli_logits"):
            torch.testing.assert_close(view[key], single[key], atol=LOGITS_ATOL, rtol=0)
        # the record counts the whole calibration, not a rank's share
        assert view["per-layer_tokens"] == view["global_tokens"] == 8 * 32
        assert view["ppl"]["tokens"] == single["ppl"]["tokens"] == 6 * 31
        assert view["ppl"]["nll"] == pytest.approx(single["ppl"]["nll"], rel=NLL_RTOL)
        assert view["mc"] == single["mc"]
        assert view["cli_rc"] == 0
        assert "cannot be shared among 2 processes" in view["one_window_error"]
    assert single["one_window_error"] is None
    # both ranks ended with bitwise the same model (rank 0's eigenvectors are broadcast)
    assert torch.equal(views[0]["per-layer_logits"], views[1]["per-layer_logits"])
    # rank 0 alone wrote the folder: exactly one complete folder, no partial leftovers
    assert json.loads((tmp_path / "dist_out" / "slicing.json").read_text())["calibration"]["tokens"] == 4 * 32
    assert sorted(p.name for p in tmp_path.iterdir() if "dist_out" in p.name) == ["dist_out"]


def test_shards_partition_in_order():
    items = list(range(11))
    for world in (1, 2, 3, 4, 11, 12):
        parts = [distributed.shard(items, world, r) for r in range(world)]
        assert [x for part in parts for x in part] == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    rows = torch.arange(10).view(5, 2)
    assert torch.equal(distributed.shard(rows, 2, 1), rows[2:])


def test_without_a_process_group_everything_is_local():
    t = torch.arange(3, dtype=torch.float64)
    assert distributed.all_reduce_sum_(t) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert distributed.sum_counts(1.5, 2) == (1.5, 2.0)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.on_main(lambda: "written") == "written"
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]


def test_world_size_without_rendezvous_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(MechsliceError, match="launch with torchrun"):
        distributed.init_from_env()


# ---- device maps ---------------------------------------------------------------------------------------------

LAYERS_ON_CPU = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _tiny_folder(tmp_path_factory.mktemp("tiny"))


@torch.no_grad()
def _logits(lm: LoadedModel) -> torch.Tensor:
    return lm.model(_ids(2, 16, IDS_SEED).to(lm.device)).logits.cpu()


@pytest.mark.parametrize("rotation", ["per-layer", "global"])
def test_layer_by_layer_on_a_device_map_equals_in_memory(tiny, rotation):
    from mechslice.slicing import slice_model

    calib = _ids(8, 32, CALIB_SEED)
    whole = load_model(str(tiny), device="cpu", dtype=torch.float32)
    mapped = load_model(str(tiny), device_map=LAYERS_ON_CPU, dtype=torch.float32)
    # every layer sits where the map put it; the same weights on the same device give the same logits exactly
    assert {p.device.type for p in mapped.model.parameters()} == {"cpu"}
    assert torch.equal(_logits(mapped), _logits(whole))
    slice_model(whole, 0.25, calib, rotation, batch_size=4, progress=False)
    slice_model(mapped, 0.25, calib, rotation, batch_size=4, progress=False)
    # same batches, same devices: the two paths do the same float operations (1e-6: fp32 rounding headroom)
    torch.testing.assert_close(_logits(mapped), _logits(whole), atol=1e-6, rtol=0)


def test_disk_offload_evaluates_like_in_memory_and_slicing_refuses_it(tiny, tmp_path):
    from mechslice.perplexity import evaluate_perplexity
    from mechslice.slicing import slice_model

    offloaded = load_model(
        str(tiny),
        device_map={**LAYERS_ON_CPU, "model.layers.1": "disk"},
        offload_folder=tmp_path / "offload",
        dtype=torch.float32,
    )
    assert any(p.device.type == "meta" for p in offloaded.model.parameters())
    whole = load_model(str(tiny), device="cpu", dtype=torch.float32)
    # accelerate streams the offloaded layer's own weights back in: the computation is the same, bit for bit
    assert torch.equal(_logits(offloaded), _logits(whole))
    windows = _ids(4, 32, EVAL_SEED)
    ppl = evaluate_perplexity(offloaded.model, windows, batch_size=2, progress=False)
    assert ppl.nll == evaluate_perplexity(whole.model, windows, batch_size=2, progress=False).nll
    with pytest.raises(MechsliceError, match="offloaded"):
        slice_model(offloaded, 0.25, _ids(8, 32, CALIB_SEED), progress=False)


def test_device_map_for_a_gguf_or_sliced_folder_is_refused(tiny, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(MechsliceError, match="needs a model folder"):
        load_model(str(gguf), device_map="auto")
    (tmp_path / "sliced").mkdir()
    (tmp_path / "sliced" / "slicing.json").write_text("{}")
    with pytest.raises(MechsliceError, match="drop the device map"):
        load_model(str(tmp_path / "sliced"), device_map="auto")


if __name__ == "__main__":
    _worker(*sys.argv[1:])
