# make demo   set up .venv, run the main job on the embedded defaults, print where the results are
# make test   set up .venv, run the whole test suite (GPU, scale and long tests aside)
#
# TORCH_SPEC picks the torch build: the default is the CPU build this project's CI uses;
# on a GPU machine use e.g. `make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"`.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_CONFIG ?= jobs/configs/gemma3-270m_to_270m-layers0-3_cpu.yaml
PYTEST_ARGS ?= -m "not gpu and not scale and not long"

.PHONY: demo test setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-build-isolation 'deepspeed==0.19.8'
	touch $@

demo: setup
	$(PY) -m jobs.pipeline --config $(DEMO_CONFIG)
	$(VENV)/bin/distill inspect runs/demo/records --examples 2

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest --durations=20 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
