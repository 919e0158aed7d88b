# Shortcuts for tools/bootstrap.sh, which works without make on a fresh host.
.PHONY: run test setup unit integration bench
run:
	bash tools/bootstrap.sh run
test:
	bash tools/bootstrap.sh test
setup:
	bash tools/bootstrap.sh setup
unit: setup
	.venv/bin/python -m pytest tests/unit
integration: setup
	.venv/bin/python -m pytest tests/integration
