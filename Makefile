# Set-up and entry points. `make demo` and `make test` install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install demo test clean

install: $(VENV)/.installed $(FMNIST)

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

# fmnist-large (global batch 1024) with two processes on one machine.
demo: install
	rm -rf runs/demo
	$(VENV)/bin/torchrun --nproc_per_node 2 -m largebatch train --recipe fmnist-large --out runs/demo

test: install
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
