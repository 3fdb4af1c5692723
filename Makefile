# Two entry points: `make demo` and `make test`. Each creates/updates ./.venv with nothing but Python.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: demo test figures venv venv-test clean-venv

$(VENV)/.base: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

# torch is pinned to the CPU build and installed before anything that depends on it (see docs/install notes).
$(VENV)/.test: $(VENV)/.base setup.py
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,aot]"
	# lpips (the PyTorch reference for our LPIPS) declares torchvision, which must not replace the CPU torch.
	$(PIP) install -q --no-deps "lpips==0.1.4"
	touch $@

venv: $(VENV)/.base
venv-test: $(VENV)/.test

demo: $(VENV)/.base
	$(PY) -m qwenimage_jax.cli demo --out out/demo

test: $(VENV)/.test
	$(PY) -m pytest -q -n 2 --dist loadfile tests $(PYTEST_ARGS)

# every figure in README.md and docs/ rewritten from its JSON artifact (docs/figures.py), the AOT table from
# docs/aot/*.json and docs/configuration.md from configs/
figures: $(VENV)/.base
	$(PY) docs/gen_aot_table.py
	$(PY) docs/gen_configuration.py
	$(PY) docs/figures.py

clean-venv:
	rm -rf $(VENV)
