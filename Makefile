# Two commands set everything up on a fresh machine:
#   make main   # venv + install, then the side-by-side run on AG News (1 process, native DDP, hand-written DDP)
#   make test   # venv + install, then the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch; pinned here (not in pyproject.toml) so GPU users keep their CUDA build.
TORCH  ?= torch==2.13.0

NPROC  ?= 2
DATA   ?= ../shared/ag_news
MODEL  ?= minilm-l6
MAIN_ARGS ?= --max-train-samples 4000 --max-length 64 --batch-size 16 --epochs 1 --lr 1e-4

.PHONY: install main test bench clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[offline,dev]"
	touch $@

main: install
	$(BIN)/python -m experiments.compare --nproc $(NPROC) --data-dir $(DATA) --model $(MODEL) $(MAIN_ARGS)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
