# Two commands do all the set-up: `make demo` and `make test`.
# Both create (or refresh, when the package's requirements change) the virtual
# environment .venv, pinning the CPU build of torch before DeepSpeed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

export DS_ACCELERATOR ?= cpu

.PHONY: demo test venv clean

# The main job: 4 ranks (CPU without a GPU) train the MoE language model of configs/dualpipe_moe.json
# through DeepSpeed's launcher; outputs in runs/dualpipe_moe/.
demo: $(STAMP)
	$(PY) -m deepspeed_dualpipe demo --config configs/dualpipe_moe.json --ranks 4

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

venv: $(STAMP)

$(STAMP): pyproject.toml setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,plot]'
	@# DeepSpeed JIT-compiles its CPU shared-memory op on first use (minutes on 2 cores): do it here,
	@# once, rather than inside the first multi-process test's time limit.
	$(PY) -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
