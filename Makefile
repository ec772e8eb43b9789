# Quickstart: `make demo`, then `make test`, then `make ui`. Everything lands in .venv and outputs/.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check
PORT    ?= 5000
OUT     ?= outputs
VBENV   := .venv-vbench

.PHONY: install vbench-env browser demo smoke test ui bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, from its pinned CPU build; then the project with the same pin as a constraint so no
# dependency can pull a CUDA build of torch.
$(VENV)/.installed: pyproject.toml constraints.txt | $(PY)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[text]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install --quiet -c constraints.txt -e ".[text,dev]"
	touch $@

install: $(VENV)/.installed

# VBench (eval/vbench.py) runs in its own env: vbench 0.1.5 pins transformers==4.33.2, numpy<2 and
# timm<=1.0.12, and imports torchvision, which the CPU torch above lacks. Every package is pinned in
# constraints-vbench.txt (torch is the registry's CUDA build, which runs on CPU). One pip call, one
# resolution: vbench itself does not require torch, timm and pyiqa pull it in. eval/vbench.py runs
# $(VBENV)/bin/python by default, so the folder name is fixed (:=).
$(VBENV)/.installed: constraints-vbench.txt
	python3 -m venv $(VBENV)
	$(VBENV)/bin/python -m pip install --disable-pip-version-check --quiet -c constraints-vbench.txt \
		vbench==0.1.5 torch torchvision setuptools
	touch $@

vbench-env: $(VBENV)/.installed  ## .venv-vbench, the environment eval/vbench.py runs vbench in

# tests/test_ui.py drives Debian's Chromium through Debian's chromedriver (selenium is given the
# driver's path and downloads nothing). Installed from apt only when either file is missing; as root
# directly, else through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:  ## /usr/bin/chromium and /usr/bin/chromedriver (apt: chromium chromium-driver), for tests/test_ui.py
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver; \
	fi

demo: $(VENV)/.installed  ## the main job: configs/ablation/demo.yaml on Shapes, then its comparison report
	$(VENV)/bin/vidlab sweep configs/ablation/demo.yaml
	$(VENV)/bin/vidlab compare demo
	@echo "compare the runs in the MLflow UI: make ui   (then http://127.0.0.1:$(PORT))"

smoke: $(VENV)/.installed  ## a tiny model in under a minute
	$(VENV)/bin/vidlab fit smoke

test: $(VENV)/.installed-dev $(VBENV)/.installed browser  ## the whole test suite (CPU; VBench through .venv-vbench; the MLflow UI in Chromium)
	$(PY) -m pytest -q --durations=25

bench: $(VENV)/.installed-dev  ## benchmarks/overhead.py (harness vs plain loop); the other benchmarks/*.py run alone, see the README
	$(PY) benchmarks/overhead.py

ui: $(VENV)/.installed  ## the MLflow UI over the embedded store, on 127.0.0.1 only
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(abspath $(OUT))/mlflow.db --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf $(OUT)
