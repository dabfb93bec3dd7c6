# The few commands people type. Every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# torch 2.14.1 + torchvision 0.29.1 lie on the CI machines' disk; any torch in the range works.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo loss-demo study test lint bench mutants clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The native CPU kernel (csrc/) compiles against the installed torch, hence no build isolation;
# `$(PY) -m acl_kernels.info` says which backends the install has.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp) | $(PY)
	$(PIP) install -q --upgrade pip "setuptools>=77" wheel
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q --no-build-isolation -e ".[train,bench,dev]"
	$(PY) -m acl_kernels.info
	touch $(STAMP)

# Train on the embedded MNIST-LT default (CPU, a few minutes); prints top-1 and Many/Medium/Few,
# then the study's numbers for the same config. Each demo run gets a folder of its own under runs/.
demo: $(STAMP)
	$(PY) -m train --config mnist_lt_acl --output runs --name demo-$$(date +%Y%m%d-%H%M%S) --progress false
	$(PY) -m train.study --summary mnist_lt_acl

# The MNIST-LT study (every loss searched, V = 2/4/8, 5 paired seeds, ACL ablation; CPU, hours;
# resumes where it stopped): train/results/study.{csv,md} and study_*.png.
study: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 19 $(PY) -m train.study

loss-demo: $(STAMP)
	$(PY) -m acl_kernels.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Mutation testing ([tool.mutmut] in pyproject.toml): about 30 min on 2 idle cores (1942 mutants); MUTANTS="name ..." runs a subset.
mutants: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 19 $(VENV)/bin/mutmut run --max-children 2 $(MUTANTS)
	$(VENV)/bin/mutmut results

bench: $(STAMP)
	$(PY) bench/bench_loss.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache acl_kernels/_C*.so mutants
