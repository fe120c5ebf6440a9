# comap-reduce developer targets (07 §5.2). `make demo` and `make test` create .venv themselves.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.comap-installed

.PHONY: env demo test bench lint clean

$(STAMP): pyproject.toml setup.py $(wildcard utils/kernels/*.pyx)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

env: $(STAMP)

demo: env
	@test -f demo/remote/obs_index.csv || $(PY) -m utils.simulator archive --preset demo --out demo/remote --seed 1
	$(PY) run.py parameter_files/main_run.toml
	$(PY) -m utils.simulator report demo/

test: env
	$(PY) -m pytest -q

bench: env
	$(PY) -m benchmarks.run

lint: env
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache demo
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
	find utils/kernels \( -name '*.so' -o -name '*.c' -o -name '*.cpp' \) -delete
