# The two commands a newcomer runs: `make demo` and `make test`. Both create (or reuse) the venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
INSTALLED := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# DeepSpeed JIT-builds the few ops it needs on first use; nothing is compiled at install time.
export DS_BUILD_OPS := 0

.PHONY: install test unit lint typecheck crds docs demo bench clean

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	@echo "installing torch $(TORCH_VERSION) (CPU build) before anything can pull another one"
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	@echo "installing finetune-operator with its operator, trainer and dev extras"
	$(PY) -m pip install --quiet -e ".[operator,trainer,dev]"
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('$(TORCH_VERSION)') else f'torch was replaced: {v}')"
	touch $@

install: $(INSTALLED)

crds: $(INSTALLED)
	$(VENV)/bin/ftjob crd --write crds

docs: $(INSTALLED)
	$(VENV)/bin/ftjob docs --write docs/api.md

lint: $(INSTALLED)
	$(VENV)/bin/ruff check operator trainer_image tests benchmarks

typecheck: $(INSTALLED)
	$(VENV)/bin/mypy

test: $(INSTALLED) lint typecheck
	$(PY) -m pytest

unit: $(INSTALLED)
	$(PY) -m pytest tests/unit -q

demo: $(INSTALLED)
	@$(VENV)/bin/ftjob validate examples/tiny-cpu.yaml
	@$(VENV)/bin/ftjob render examples/tiny-cpu.yaml > /dev/null && echo "examples/tiny-cpu.yaml renders to a Service, a ConfigMap and 2 rank pods (ftjob render examples/tiny-cpu.yaml)"
	@echo
	@echo "Not built yet: running the job on this machine (ftjob run, the local backend). The trainer is"
	@echo "built and tested (tests/integration); until ftjob run lands, make demo stops at rendering."

# Not part of `make test`: each prints a ratio against a baseline measured in the same run.
bench: $(INSTALLED)
	$(PY) benchmarks/checkpoint_stall.py
	$(PY) benchmarks/upload_throughput.py
	$(PY) benchmarks/trainer_overhead.py
	$(PY) benchmarks/operator_scale.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
