# The two commands a new user runs: `make demo` and `make test`. Both set up first.
SHELL := /bin/bash
.DEFAULT_GOAL := help
ENV := source scripts/env.sh && source install/setup.bash

.PHONY: help setup build test lint format demo clean

help:
	@echo "make setup  - build .venv/, colcon build/ and install/ (idempotent)"
	@echo "make test   - setup, lint, then run every test"
	@echo "make demo   - setup, then bag -> node -> out/demo/ (timing report, overlays)"
	@echo "make lint   - ruff check + format check"
	@echo "make format - ruff format + fixes"

setup:
	@bash scripts/setup.sh

build: setup

lint: setup
	@source scripts/env.sh && ruff check . && ruff format --check .

format: setup
	@source scripts/env.sh && ruff check --fix . && ruff format .

test: setup lint
	@$(ENV) && python -P -m pytest -q $(PYTEST_ARGS)

demo: setup
	@$(ENV) && bash scripts/demo.sh

clean:
	rm -rf build install log out
