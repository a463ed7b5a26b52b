# Set-up and entry points. `make demo` and `make test` install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages: the dataset; Open MPI and Slurm for the multi-host tests; a C++ compiler
# and ninja, which build the fused CPU kernels (and torch.compile's) at their first use.
DEBS := dataset-fashion-mnist openmpi-bin slurm-wlm munge g++ ninja-build

.PHONY: install debs demo test test-cluster clean

install: $(VENV)/.installed debs

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

debs:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# fmnist-large (global batch 1024) with two processes on one machine.
demo: install
	rm -rf runs/demo
	$(VENV)/bin/torchrun --nproc_per_node 2 -m largebatch train --recipe fmnist-large --out runs/demo

# In parallel, one worker per core; the slowest tests are listed at the end.
test: install
	$(PY) -m pytest -q -n auto --durations=15 -m "not cluster"

# Several hosts on this machine (network namespaces, torchrun, mpirun, a real Slurm); needs root.
test-cluster: install
	$(PY) -m pytest -q -m cluster

clean:
	rm -rf runs .pytest_cache
