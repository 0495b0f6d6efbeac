# Two commands do all the setup on a fresh machine:
#   make demo   -- create .venv, install, run the demo on the bundled siftsmall data
#   make test   -- create .venv, install, run the whole test suite (CI runs exactly this)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch==2.13.0 resolves to a local CPU build here; without the pin pip fetches gigabytes of CUDA wheels.
# numpy<2.4 is needed by the Triton interpreter (TRITON_INTERPRET=1) that runs the kernel tests on CPU.
PINS   := torch==2.13.0 triton==3.6.0 "numpy<2.4"

.PHONY: demo test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PINS)
	$(BIN)/python -m pip install -q $(PINS) -e ".[cpu,plot,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flashgmm-faiss demo --out flashgmm_demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) flashgmm_demo .pytest_cache
