# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv on first use and install the package into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch/torchvision pinned to the releases fastmri resolves to here (CPU use; no newer torch).
TORCH_PINS := "torch==2.14.1" "torchvision==0.29.1"

# The MONAI Label app's server test runs in its own environment: the 'label' extra pins numpy<2 and jsonschema<4
# (through pydicom-seg), which the 'dev' extra (jsonschema>=4) excludes. It is layered on .venv (a .pth file puts
# .venv's site-packages after its own), so torch, ITK and the rest are not installed twice: about 1.7 GB, not 8.
LABEL_VENV ?= .venv-label
LABEL_PY   := $(LABEL_VENV)/bin/python

.PHONY: venv test test-label demo lint clean

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
	$(MAKE) test-label

$(LABEL_VENV)/.installed: $(VENV)/.installed pyproject.toml
	$(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_PY) -c 'import site, sys; open(site.getsitepackages()[0] + "/hyper_dm_main_venv.pth", "w").write(sys.argv[1])' \
		"$$($(PY) -c 'import site; print(site.getsitepackages()[0])')"
	$(LABEL_PY) -m pip install --upgrade pip
	$(LABEL_PY) -m pip install -e ".[mri,label]" "pytest>=8"  # mri: the synthetic writers the test uses
	touch $@

# a real `monailabel start_server` on 127.0.0.1; HYPER_DM_REQUIRE_LABEL=1: a missing MONAI Label fails, not skips
test-label: $(LABEL_VENV)/.installed
	HYPER_DM_REQUIRE_LABEL=1 $(LABEL_PY) -m pytest -q tests/test_monailabel.py

lint: venv
	$(VENV)/bin/ruff check hyper_dm scripts tests

clean:
	rm -rf $(VENV) $(LABEL_VENV) *.egg-info .pytest_cache
