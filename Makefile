# Two commands do everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3.11
VENV := .venv
INTEROP_VENV := .venv-interop
PY := $(VENV)/bin/python
export TFDS_DATA_DIR ?= $(CURDIR)/data/tfds
WORKDIR ?= workdirs/default
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: train test test-all test-interop data clean

# $(call venv,DIR,EXTRA_REQUIREMENTS): the project and its pinned requirements in a new venv.
define venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q -r requirements.txt $(2)
	$(1)/bin/python -m pip install -q --no-deps -e .
	touch $(1)/.installed
endef

$(VENV)/.installed: requirements.txt setup.py
	$(call venv,$(VENV))

# The project plus torch and timm (~5.5 GB), apart from the main venv, for `make test-interop`.
$(INTEROP_VENV)/.installed: requirements.txt requirements-interop.txt setup.py
	$(call venv,$(INTEROP_VENV),-r requirements-interop.txt)

$(FASHION_MNIST):
	$(SUDO) apt-get install -y dataset-fashion-mnist || \
	  ($(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist)

data: $(VENV)/.installed $(FASHION_MNIST)
	$(PY) -m vit_jax.datasets prepare fashion_mnist --data_dir=$(TFDS_DATA_DIR)

# Pre-trains the embedded default (a ViT on Fashion-MNIST, ~8 minutes on 2 CPU cores).
train: data
	$(PY) -m vit_jax.main --config=configs/default.py --workdir=$(WORKDIR)

# The quick suite (slow tests are marked and skipped; `make test-all` runs them too).
test: $(VENV)/.installed $(FASHION_MNIST)
	$(PY) -m pytest -q -n 2 --dist=loadfile

test-all: $(VENV)/.installed $(FASHION_MNIST)
	$(PY) -m pytest -q -n 2 --dist=loadfile -m ""

# timm's reader of the released checkpoints loads our .npz files and gives our logits.
test-interop: $(INTEROP_VENV)/.installed
	$(INTEROP_VENV)/bin/python -m pytest -q -m interop tests/test_interop_timm.py

clean:
	rm -rf $(VENV) $(INTEROP_VENV) data workdirs
