#!/usr/bin/env bash
# Wheels for the GPU machine's Python (3.12, x86-64), which has torch, transformers and triton but no
# DeepSpeed and no registry: DeepSpeed (built here without ops, a pure-Python wheel) and the
# packages it needs that the machine lacks. Run once on a machine with pip access, from the
# repository root; run.sh installs whatever lies in .whl/ (ignored by git; carry it to the machine).
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
DEST=${1:-.whl}
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$DEST" pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
# DeepSpeed ships an sdist only; without its ops the wheel is pure Python (its setup imports torch,
# hence no build isolation).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
ls -l "$DEST"
