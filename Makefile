# Two commands do all the set-up: `make demo` and `make test`.
# Both create (or refresh, when the package's requirements change) the virtual
# environment .venv, pinning the CPU build of torch before DeepSpeed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

# DS_ACCELERATOR is not exported from here: `make demo` leaves DeepSpeed's choice to the launcher (GPUs where they
# exist, the CPU otherwise; tools/lm/launch.py); the tests pick the CPU themselves (tests/conftest.py).
# DeepSpeed's JIT-built ops live inside the environment, not in ~/.cache: a build killed elsewhere
# leaves a lock there that torch waits on forever (a CI run hung on one for its whole time limit).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: demo test gpu-check lint format venv clean

# The main job: 4 ranks (one GPU each where 4 exist, else the CPU) train the MoE language model of configs/dualpipe_moe.json
# through DeepSpeed's launcher; outputs in runs/dualpipe_moe/.
demo: $(STAMP)
	$(PY) -m deepspeed_dualpipe demo --config configs/dualpipe_moe.json --ranks 4

test: $(STAMP)
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} $(PY) -m pytest -q $(PYTEST_ARGS)

# Every gpu-marked test of the tree (tests/gpu, the CUDA overlap, memory and apex tests) in one run, then one
# report: what ran, on how many GPUs, and the figures (docs/gpu.md). Without a GPU it says so, in a second.
gpu-check: $(STAMP)
	$(PY) deepspeed_dualpipe/testing/gpu_check.py $(PYTEST_ARGS)

# DeepSpeed's formatter (yapf, 119 columns, .style.yapf) and linter (flake8 on E9,F,W6, setup.cfg).
LINTED := deepspeed_dualpipe tests examples

lint: $(STAMP)
	$(PY) -m flake8 $(LINTED)
	$(PY) -m yapf --diff --recursive $(LINTED) > /dev/null || { $(PY) -m yapf --diff --recursive $(LINTED); \
		echo "yapf would reformat the files above: run 'make format'"; exit 1; }

format: $(STAMP)
	$(PY) -m yapf --in-place --recursive $(LINTED)

venv: $(STAMP)

$(STAMP): pyproject.toml setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,plot,lint,megatron]'
	@# DeepSpeed JIT-compiles its CPU shared-memory op on first use (minutes on 2 cores): do it here,
	@# once, rather than inside the first multi-process test's time limit. Nothing else builds during
	@# set-up, so a lock left here is stale (an interrupted build) and would make the load wait forever.
	rm -f $(TORCH_EXTENSIONS_DIR)/deepspeed_shm_comm/lock
	DS_ACCELERATOR=cpu timeout 1200 $(PY) -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
