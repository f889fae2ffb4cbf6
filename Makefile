# herd: the two commands are `make demo` (a local lab cluster deployed by site.yml) and `make test`
# (lint, unit tests and every molecule scenario). Both start from a bare Debian/Ubuntu machine as root.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
SCENARIOS ?= $(sort $(notdir $(patsubst %/molecule.yml,%,$(wildcard molecule/*/molecule.yml))))

.PHONY: demo test bootstrap lab-artifacts lab-up lab-down lint unit molecule bench clean help

help:
	@echo "make demo      build and deploy the local lab cluster (3 systemd hosts) and smoke it through the gateway"
	@echo "make test      lint + unit tests + every molecule scenario (what CI runs)"
	@echo "make lab-down  remove the lab's containers and network"

bootstrap:
	@scripts/bootstrap.sh

lab-artifacts: bootstrap
	@lab/build-ollama-archive.sh lab/build

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

unit: bootstrap
	$(BIN)/pytest tests/unit -q

molecule: lab-artifacts
	@set -e; for s in $(SCENARIOS); do \
	  echo "=== molecule test -s $$s"; \
	  $(BIN)/molecule test -s $$s; \
	done

test: lint unit molecule
	@echo "make test: all stages passed"

bench: bootstrap
	@benchmarks/run.sh

clean: lab-down
	rm -rf lab/build
