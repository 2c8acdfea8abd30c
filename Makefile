# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv on first use and install the package into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch/torchvision pinned to the releases fastmri resolves to here (CPU use; no newer torch).
TORCH_PINS := "torch==2.14.1" "torchvision==0.29.1"

.PHONY: venv test demo lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_PINS)
	$(PY) -m pip install -e ".[dev,mri]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) scripts/demo.py

test: venv
	$(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check hyper_dm scripts tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
