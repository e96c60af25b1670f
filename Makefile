# Set-up and entry points. Everything installs into a local virtual environment.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch; override e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" for CUDA.
TORCH ?= torch==2.13.0
# The versions the suite last passed with (see the file); CONSTRAINTS= installs the newest that pyproject.toml allows.
CONSTRAINTS ?= constraints.txt
COMPAT_CONSTRAINTS ?= tests/compat/constraints.txt
DEMO_DIR ?= demo
SHARED_VIDEO ?= ../shared/data/videos/woman-running.mp4

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# An older stack (diffusers 0.3x, transformers 4.x) that exported weights must load in.
COMPAT_VENV ?= .venv-compat
COMPAT_STAMP := $(COMPAT_VENV)/.installed

.PHONY: install test test-fast demo bench clean browser constraints

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

$(COMPAT_STAMP): tests/compat/requirements.txt $(COMPAT_CONSTRAINTS)
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q $(TORCH)
	$(COMPAT_VENV)/bin/python -m pip install -q $(if $(COMPAT_CONSTRAINTS),-c $(COMPAT_CONSTRAINTS)) -r tests/compat/requirements.txt
	touch $(COMPAT_STAMP)

## After a deliberate upgrade (`make install CONSTRAINTS=` and a green `make test`): pin what passed.
constraints: $(STAMP) $(COMPAT_STAMP)
	{ sed -n '/^#/p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E '^(vfx|torch)=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	{ sed -n '/^#/p' $(COMPAT_CONSTRAINTS); $(COMPAT_VENV)/bin/python -m pip freeze | grep -v -i '^torch=='; } > $(COMPAT_CONSTRAINTS).new
	mv $(COMPAT_CONSTRAINTS).new $(COMPAT_CONSTRAINTS)

## Debian's chromium for the report's browser test (installed when missing and apt is usable).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "note: chromium could not be installed; the report's browser test will be skipped"

## Run the whole test suite, slow campaigns included (CI runs this); only GPU tests are left out.
test: $(STAMP) $(COMPAT_STAMP) browser
	VFX_COMPAT_PYTHON=$(abspath $(COMPAT_VENV))/bin/python $(BIN)/python -m pytest -q -m "not gpu"

## The quick loop: leaves out the slow campaigns (kill/resume, concurrent shards, SLURM pipelines,
## hypothesis, torchrun) too.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

## The main job: a real video through every video stage on the embedded tiny model.
demo: $(STAMP)
	VFX=$(BIN)/vfx DEMO_DIR=$(DEMO_DIR) SHARED_VIDEO=$(SHARED_VIDEO) bash examples/demo.sh

bench: $(STAMP)
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(DEMO_DIR) .pytest_cache $(COMPAT_VENV)
