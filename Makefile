# The README's commands. Each installs into .venv first when needed (scripts/install.sh).
PY := .venv/bin/python
STAMP := .venv/.ovseg-installed
VOCAB ?= sky,grass,house,sun,tree
DEMO_INPUT ?= demo/examples/scene.jpg

.PHONY: install demo test lint bench

$(STAMP): scripts/install.sh setup.py
	bash scripts/install.sh

install: $(STAMP)

# Segments the bundled example with stock CLIP weights; where they cannot be downloaded (exit code 3),
# runs again with random weights so the whole pipeline is still shown.
demo: $(STAMP)
	@$(PY) demo/demo.py --vocab "$(VOCAB)" --input $(DEMO_INPUT) --output output/; rc=$$?; \
	if [ $$rc -eq 3 ]; then \
	  echo "[demo] no CLIP weights reachable: running with --random-init (segmentation is meaningless)"; \
	  $(PY) demo/demo.py --vocab "$(VOCAB)" --input $(DEMO_INPUT) --output output/ --random-init; \
	else exit $$rc; fi

lint: $(STAMP)
	$(PY) -m ruff check $(wildcard ovseg tests demo benchmarks datasets scripts) train_net.py setup.py

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_dense.py
