# make install : .venv with everything (CPU torch 2.13.0 here; on a node with an NVIDIA driver, the CUDA torch pip finds),
#                every other package at the tested version in constraints.txt (docs/reproducibility.md)
#                newer versions: make install VENV=.venv-new CONSTRAINTS=   (pyproject.toml's lower bounds only)
# make test    : the test suite (what .ci/run calls) in 2 pytest-xdist workers (WORKERS=N), one test file per worker
# make demo    : the built-in lab on CPU: o_proj vs full fine-tuning over 3 training seeds (`sfn lab --seeds 3`;
#                12 min here, installs first if needed; docs/lab.md)
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/pip
CONSTRAINTS ?= constraints.txt
WORKERS ?= 2
PIN    := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: install test test-fast demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# Pin torch first: an unpinned torch pulls a multi-GB CUDA build on CPU-only machines, and the later install
	@# must never upgrade it (pip leaves an already satisfied torch>=2.13 alone).
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install -q $(PIN) "torch>=2.13.0"; \
	else \
		$(PIP) install -q $(PIN) torch==2.13.0; \
	fi
	DS_BUILD_OPS=0 $(PIP) install -q $(PIN) -e ".[test]"
	touch $@

# DeepSpeed compiles its CPU communication op on first use into TORCH_EXTENSIONS_DIR; one per venv, so that two
# checkouts on one machine never wait on each other's build lock in the shared ~/.cache.
test: export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
test-fast: export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

test: install
	$(VENV)/bin/python -m pytest -q -n $(WORKERS) --dist loadfile

test-fast: install
	$(VENV)/bin/python -m pytest -q -n $(WORKERS) --dist loadfile -m "not slow"

demo: install
	$(VENV)/bin/sfn lab --seeds 3

clean:
	rm -rf $(VENV) lab runs
