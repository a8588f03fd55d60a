# Both targets do all set-up on a fresh machine: create .venv, install torch 2.13.0 (CPU) and
# this package with its test extras, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nmcompile-installed

.PHONY: test demo lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,examples]"
	touch $(STAMP)

# The suite runs on one worker per core (at most 4), a test file to a worker: its module fixtures
# (the sm90 compile of every kernel) are built once, and the DDP tests' ports stay apart.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile

demo: $(STAMP)
	$(PY) examples/tiny_gpt.py --compare --steps 800 --eval-interval 200

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
