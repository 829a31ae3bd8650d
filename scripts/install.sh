#!/usr/bin/env bash
# Creates a virtual environment with torch, detectron2, a panoptic-quality backend and ovseg (editable, with
# test and export extras). Safe to re-run. Environment overrides:
#   OVSEG_VENV   where the venv goes (default .venv)
#   PYTHON       interpreter used to create it (default python3)
#   TORCH_SPEC   pip spec for torch/torchvision (default: the pinned pair below; pick the build for your CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${OVSEG_VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
D2_GIT="git+https://github.com/facebookresearch/detectron2.git"
PANOPTICAPI_GIT="git+https://github.com/cocodataset/panopticapi.git"
# Offline fallback for detectron2: a PyPI build of upstream detectron2 (2024), published only as a cp310 wheel.
D2_FALLBACK="sal-detectron2==0.7.2"

say() { printf '\n[install] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
# git must fail at once when github is unreachable, never wait for a password prompt
export GIT_TERMINAL_PROMPT=0

"${PIP[@]}" install -q --upgrade pip setuptools wheel

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  say "installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "${PIP[@]}" install -q $TORCH_SPEC
fi

install_d2_fallback() {
  local tmp site
  tmp=$(mktemp -d)
  # its requirements, with the pins that build needs (numpy<2 and an opencv built against it)
  "${PIP[@]}" install -q "numpy<2" "opencv-python-headless<4.12" "Pillow>=7.1" matplotlib "pycocotools>=2.0.2" \
    "termcolor>=1.1" "yacs>=0.1.8" tabulate cloudpickle "tqdm>4.29.0" tensorboard "omegaconf>=2.1,<2.4" \
    "hydra-core>=1.1" black packaging "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10"
  "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.10 "$D2_FALLBACK" -d "$tmp"
  site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  "$PY" scripts/unpack_detectron2.py "$tmp"/*.whl "$site"
  rm -rf "$tmp"
  touch "$VENV/.d2-fallback"
}

if "$PY" -c "import detectron2" 2>/dev/null; then
  say "detectron2 already installed: $("$PY" -c 'import detectron2, os; print(detectron2.__version__, os.path.dirname(detectron2.__file__))')"
else
  say "detectron2: trying the official route ($D2_GIT)"
  # The official build compiles against the installed torch, hence --no-build-isolation.
  if "${PIP[@]}" install -q --no-build-isolation "$D2_GIT" 2>/tmp/ovseg-d2-git.log; then
    say "detectron2 ROUTE: official (built from github, compiled ops included)"
  else
    say "official route failed ($(tail -n 1 /tmp/ovseg-d2-git.log)); using the offline fallback"
    install_d2_fallback
    say "detectron2 ROUTE: offline fallback ($D2_FALLBACK Python sources, no compiled ops)"
  fi
fi
"$PY" -c "import detectron2.modeling, detectron2.engine, detectron2.evaluation"

if "$PY" -c "import panopticapi.evaluation" 2>/dev/null || "$PY" -c "import hotcoco.panoptic" 2>/dev/null; then
  say "panoptic-quality backend already installed"
elif "${PIP[@]}" install -q "$PANOPTICAPI_GIT" 2>/dev/null; then
  say "panoptic quality: panopticapi (official)"
else
  say "panopticapi unreachable; panoptic quality: hotcoco"
  "${PIP[@]}" install -q hotcoco
fi

say "installing ovseg (editable, with test and export extras)"
# the fallback build needs numpy<2: keep pip from upgrading it
extra=(); [ -f "$VENV/.d2-fallback" ] && extra=("numpy<2" "opencv-python-headless<4.12")
"${PIP[@]}" install -q -e ".[test,export]" "${extra[@]}"
"$PY" -c "import ovseg, detectron2; print('ovseg', ovseg.__version__, '| detectron2', detectron2.__version__)"
touch "$VENV/.ovseg-installed"
say "done: activate with 'source $VENV/bin/activate'"
