"""Save pruned models: an ordinary Hugging Face folder (weights, config, tokenizer) plus `pruning.json`.

`mlp`, `heads` and `layers` leave a model of the family's own class with a smaller config, so the folder loads
with plain `from_pretrained` and with `load_model`. `slice` is saved by SliceGPT's own writer with `pruning.json`
beside its `slicing.json`. Either way the folder is written aside and renamed into place (`atomic_write_folder`).
"""

from __future__ import annotations

import json
from pathlib import Path

from mechslice import distributed
from mechslice.atomic import atomic_write_folder
from mechslice.loaded import LoadedModel
from mechslice.pruning.record import RECORD, PruningRecord
from mechslice.slicing.io import save_sliced


def save_pruned(lm: LoadedModel, record: PruningRecord, out: Path, overwrite: bool = False) -> Path:
    """Write the pruned model, its tokenizer and `pruning.json` to `out`, atomically."""
    out = Path(out)
    text = json.dumps(record.to_dict(), indent=1, allow_nan=False)  # strict JSON: a NaN score is refused
    if record.slicing is not None:
        return save_sliced(lm, record.slicing, out, overwrite, extra={RECORD: text})
    lm.reset_bridge()  # saving acts on the plain HF modules

    def write(folder: Path) -> None:
        lm.model.save_pretrained(folder)
        # head_dim explicit: a config that leaves it out derives hidden_size / heads, wrong once heads are cut
        config = json.loads((folder / "config.json").read_text())
        config["head_dim"] = lm.dims.h_dim
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        lm.tokenizer.save_pretrained(folder)
        (folder / RECORD).write_text(text)  # last: its presence marks a complete folder

    distributed.on_main(lambda: atomic_write_folder(out, write, overwrite))
    return out
