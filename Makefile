# The two commands of the README. Both create .venv when missing and install probseg into it,
# with torch pinned by constraints.txt (a CPU machine must never pull a CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.probseg-installed
DEMO_DIR ?= runs/demo
# The demo's configs: the synthetic experiments' shared settings, then the PU-Net's own.
DEMO_CONFIG := --config experiments/synthetic/base.yaml --config experiments/synthetic/punet.yaml

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[viz,test]'
	touch $(STAMP)

# Train the PU-Net on the built-in synthetic data, evaluate it on the test split (results table with
# the oracle row), sample hypotheses for test images, and report how well their spread matches the
# known rater distribution.
demo: $(STAMP)
	$(BIN)/probseg fit $(DEMO_CONFIG) --trainer.default_root_dir $(DEMO_DIR)
	$(BIN)/probseg test $(DEMO_CONFIG) --trainer.default_root_dir $(DEMO_DIR) \
		--ckpt_path $(DEMO_DIR)/checkpoints/last.ckpt
	$(BIN)/probseg sample --ckpt $(DEMO_DIR)/checkpoints/last.ckpt \
		--data-config experiments/synthetic/base.yaml --split test --index 0 1 2 3 4 5 6 7 \
		--num-samples 16 --out $(DEMO_DIR)/samples
	$(BIN)/python benchmarks/synthetic_ambiguity.py --ckpt $(DEMO_DIR)/checkpoints/last.ckpt

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
