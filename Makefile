# Two commands do everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export TFDS_DATA_DIR ?= $(CURDIR)/data/tfds
WORKDIR ?= workdirs/default
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: train test test-all data clean

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(FASHION_MNIST):
	$(SUDO) apt-get install -y dataset-fashion-mnist || \
	  ($(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist)

data: $(VENV)/.installed $(FASHION_MNIST)
	$(PY) -m vit_jax.datasets prepare fashion_mnist --data_dir=$(TFDS_DATA_DIR)

# Pre-trains the embedded default (a ViT on Fashion-MNIST, ~10 minutes on 2 CPU cores).
train: data
	$(PY) -m vit_jax.main --config=configs/default.py --workdir=$(WORKDIR)

# The quick suite (slow tests are marked and skipped; `make test-all` runs them too).
test: $(VENV)/.installed $(FASHION_MNIST)
	$(PY) -m pytest -q -n 2 --dist=loadfile

test-all: $(VENV)/.installed $(FASHION_MNIST)
	$(PY) -m pytest -q -n 2 --dist=loadfile -m ""

clean:
	rm -rf $(VENV) data workdirs
