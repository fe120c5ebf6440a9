# comap-reduce developer targets (docs/install.md#make-targets). `make demo` and `make test` create .venv themselves.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.comap-installed
DOCS_STAMP := $(VENV)/.comap-docs-installed

.PHONY: env demo test docs bench lint clean

$(STAMP): pyproject.toml setup.py $(wildcard utils/kernels/*.pyx)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,mpi,postgres]"
	@touch $(STAMP)

env: $(STAMP)

demo: env
	@test -f demo/remote/obs_index.csv || $(PY) -m utils.simulator archive --preset demo --out demo/remote --seed 1
	$(PY) run.py parameter_files/main_run.toml
	$(PY) -m utils.simulator report demo/
	@report=$$(ls -d logs/*_report 2>/dev/null | sort | tail -n 1); \
		if [ -n "$$report" ]; then echo "run report: $$report/index.html"; fi

test: env
	$(PY) -m pytest -q

# The documentation in docs/ (warnings are errors; no network needed) into docs/_build/html.
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['docs'], sep='\n')" \
		| xargs -d '\n' $(PY) -m pip install --quiet
	@touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

bench: env
	$(PY) -m benchmarks.run

lint: env
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache demo docs/_build
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
	find utils/kernels \( -name '*.so' -o -name '*.c' -o -name '*.cpp' \) -delete
