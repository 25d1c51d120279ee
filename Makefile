# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs torch (CPU) then secvec, runs the whole pipeline on the embedded default
#   make test   same set-up, then the full test suite (unit + end-to-end)
# Versions come from constraints.txt (what the suite was tested with).
#
# torch: the CPU build from PyTorch's CPU index when that index answers within 3 s; otherwise from whatever
# index pip is configured with (on a stock machine that is PyPI's build with CUDA, several GB). Override:
#   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128   # a CUDA build
#   make demo TORCH_INDEX_URL=                                         # the configured index
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PYTORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# Evaluated only when the install recipe runs (recursive variable): no probe on an installed tree.
TORCH_INDEX_URL ?= $(shell python3 -c "import urllib.request as u; u.urlopen('$(PYTORCH_CPU_INDEX)/torch/', timeout=3)" \
                   >/dev/null 2>&1 && echo $(PYTORCH_CPU_INDEX))
PIP_INSTALL := $(PY) -m pip install --quiet --constraint constraints.txt

.PHONY: demo test test-minimums lint install constraints clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(call install_torch,$(VENV))
	$(PIP_INSTALL) -e ".[dev]"
	touch $@
	@echo "installed; to have secvec and mlflow on your PATH: source $(VENV)/bin/activate"

# Torch from the same index as above, into the venv named by $(1).
define install_torch
	@index="$(TORCH_INDEX_URL)"; \
	if [ -n "$$index" ]; then \
	  echo "torch $(TORCH_VERSION) from $$index"; \
	  $(1)/bin/python -m pip install --quiet torch==$(TORCH_VERSION) --index-url "$$index"; \
	else \
	  echo "torch $(TORCH_VERSION) from the configured pip index"; \
	  $(1)/bin/python -m pip install --quiet --constraint constraints.txt torch==$(TORCH_VERSION); \
	fi
endef

demo: install
	$(VENV)/bin/secvec demo

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

# secvec_core alone: a fresh venv with torch, the *minimum* transformers and peft that pyproject.toml declares
# and pytest; secvec installed without extras; the `secvec` script must answer with a one-line hint; a smoke
# run trains a vector on the tiny model; then the tests that import nothing but secvec_core's dependencies.
MIN_VENV ?= .venv-minimums
test-minimums:
	rm -rf $(MIN_VENV)
	python3 -m venv $(MIN_VENV)
	$(call install_torch,$(MIN_VENV))
	$(MIN_VENV)/bin/python -m pip install --quiet $$(python3 tools/core_tests.py --minimums) "pytest>=8"
	$(MIN_VENV)/bin/python -m pip install --quiet .
	$(MIN_VENV)/bin/python -m pip check
	@if $(MIN_VENV)/bin/secvec --help > $(MIN_VENV)/hint.txt 2>&1; then \
	  echo "error: secvec ran without the pipeline extra"; exit 1; fi; \
	if [ "$$(wc -l < $(MIN_VENV)/hint.txt)" -ne 1 ] || ! grep -q "pip install 'secvec\[pipeline\]'" $(MIN_VENV)/hint.txt; then \
	  echo "error: expected a one-line hint to install secvec[pipeline], got:"; cat $(MIN_VENV)/hint.txt; exit 1; fi; \
	echo "secvec without extras: $$(cat $(MIN_VENV)/hint.txt)"
	cd /tmp && $(abspath $(MIN_VENV))/bin/python $(CURDIR)/tools/core_smoke.py
	@files="$$(python3 tools/core_tests.py)"; test -n "$$files" || { echo "no core test files found"; exit 1; }; \
	echo "core tests at the minimum versions:" $$files; $(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider $$files

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Rewrite constraints.txt from the installed venv (after upgrading a dependency and running `make test`).
constraints: install
	{ sed -n '/^#/p' constraints.txt; $(VENV)/bin/pip freeze --exclude-editable | sed 's/+[a-z0-9]*$$//'; } \
	  > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) $(MIN_VENV) .secvec
