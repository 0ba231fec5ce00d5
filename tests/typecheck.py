"""A pytest plugin (`-p tests.typecheck` in pyproject.toml) that checks every jaxtyping annotation at run time.

In tests only: beartype checks each call's arguments and return value against the annotations, and jaxtyping
binds each dimension name to one size per call. Loaded as a plugin so that it runs before any conftest or test
module imports our packages; the hook sees only modules imported after it.
"""

from __future__ import annotations

from beartype import BeartypeConf, beartype
from jaxtyping import install_import_hook

CHECKED_PACKAGES = ("hooks", "mechslice", "analyses")
# PEP 484's numeric tower, as type checkers read annotations: an int is a valid `float`, a float or int a `complex`
checker = beartype(conf=BeartypeConf(is_pep484_tower=True))

install_import_hook(CHECKED_PACKAGES, "tests.typecheck.checker")
