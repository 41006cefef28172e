PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(BIN)/medvit-explain explain sample_data/phantom_001.nii.gz --out demo_output
	$(BIN)/medvit-explain explain sample_data/phantom_001.nii.gz --roi-centers sample_data/phantom_001.json --out demo_output_roi
	$(BIN)/medvit-explain explain sample_data/phantom_001.nii.gz --model sample-roi3d --roi-mask sample_data/phantom_001_nodules.nii.gz --out demo_output_roi3d

lint: $(STAMP)
	$(BIN)/ruff check medvit_explain tests plugins scripts
	$(BIN)/ruff format --check medvit_explain tests plugins scripts

bench: $(STAMP)
	$(BIN)/medvit-explain bench

clean:
	rm -rf demo_output demo_output_roi demo_output_roi3d build *.egg-info
