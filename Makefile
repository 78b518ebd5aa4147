# The two commands a newcomer runs: `make demo` and `make test`. Both create (or reuse) the venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch the lock pins (constraints.txt): CI and the trainer image install the same one.
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)
INSTALLED := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# DeepSpeed JIT-builds the few ops it needs on first use; nothing is compiled at install time.
export DS_BUILD_OPS := 0

.PHONY: install test unit e2e lint typecheck crds docs chart-docs demo bench clean lock gpu-wheels gpu-check

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	@echo "installing torch $(TORCH_VERSION) (CPU build) before anything can pull another one"
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	@echo "installing finetune-operator with its operator, trainer, local and dev extras"
	$(PY) -m pip install --quiet -e ".[operator,trainer,local,dev]"
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('$(TORCH_VERSION)') else f'torch was replaced: {v}')"
	touch $@

install: $(INSTALLED)

crds: $(INSTALLED)
	$(PY) -m tools.k8s_schema --write
	$(VENV)/bin/ftjob crd --write crds
	$(VENV)/bin/ftjob crd --write charts/finetune-operator/crds

docs: $(INSTALLED)
	$(VENV)/bin/ftjob docs --write docs/api.md

chart-docs: $(INSTALLED)
	$(PY) -m tools.chart_values --write

lint: $(INSTALLED)
	$(VENV)/bin/ruff check operator trainer_image tests benchmarks tools

typecheck: $(INSTALLED)
	$(VENV)/bin/mypy

test: $(INSTALLED) lint typecheck
	$(PY) -m pytest

unit: $(INSTALLED)
	$(PY) -m pytest tests/unit -q

# A real cluster (kind works): see tests/e2e/test_real_cluster.py for the FTJOB_E2E_* variables.
e2e: $(INSTALLED)
	$(PY) -m pytest tests/e2e -v -rs

# The tiny example on this machine: 2 node ranks as local process groups, CPU, to Succeeded with a
# committed checkpoint and an exported model. Run it again to see it resume (or find it done).
DEMO_DIR ?= /tmp/finetune-demo
demo: $(INSTALLED)
	@$(VENV)/bin/ftjob validate examples/tiny-cpu.yaml
	@$(PY) -m finetune_trainer.tiny $(DEMO_DIR)
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(VENV)/bin/ftjob run examples/tiny-cpu.yaml --workdir $(DEMO_DIR)/run
	@echo "exported model: $$(ls -d $(DEMO_DIR)/store/default/tiny-cpu/final 2>/dev/null || echo missing)"
	@echo "look again: $(VENV)/bin/ftjob describe tiny-cpu --workdir $(DEMO_DIR)/run"

# Not part of `make test`: each prints a ratio against a baseline measured in the same run.
bench: $(INSTALLED)
	$(PY) benchmarks/checkpoint_stall.py
	$(PY) benchmarks/data_memory.py
	$(PY) benchmarks/resume_traffic.py
	$(PY) benchmarks/upload_throughput.py
	$(PY) benchmarks/trainer_overhead.py
	$(PY) benchmarks/operator_scale.py
	$(PY) benchmarks/local_recovery.py
	$(PY) benchmarks/long_context_memory.py
	$(PY) benchmarks/vs_trl_dpo.py

# What tools/gpu_check.py needs on a GPU machine whose python3 (3.12) has torch, transformers and peft
# but no network: CPython 3.12 manylinux wheels of the locked versions (never torch: the machine's
# own CUDA build stays), DeepSpeed as the pure-Python wheel it is without prebuilt ops, and our own.
GPU_WHEELS := gpu-wheels
GPU_TAGS := --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi none \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any
gpu-wheels: $(INSTALLED)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PY) -m pip download --quiet $(GPU_TAGS) -d $(GPU_WHEELS) \
		pydantic boto3 kopf tensorboard hjson ninja psutil py-cpuinfo msgpack einops nvidia-ml-py bitsandbytes
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w $(GPU_WHEELS) deepspeed
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w $(GPU_WHEELS) .
	@echo "$(GPU_WHEELS)/: $$(ls $(GPU_WHEELS) | wc -l) wheels; on the GPU machine: python3 tools/gpu_check.py --wheels $(GPU_WHEELS)"

# The same check end to end on CPU (a tiny model, fp32): what tests/integration/test_gpu_check.py runs.
gpu-check: $(INSTALLED)
	$(PY) tools/gpu_check.py --cpu

# Re-pin every installed package after a dependency change (torch without its local build label).
lock: $(INSTALLED)
	{ sed -n '/^#/p' constraints.txt; \
	  $(PY) -m pip freeze --all --exclude-editable | grep -v '^pip==' | sed -E 's/^(torch==[0-9.]+)\+.*/\1/' | grep -v '^finetune'; \
	} > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
