#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and prints its path on the last line.
#
# The environment lives OUTSIDE the clone, keyed by a hash of the dependency spec, so a fresh clone
# (CI) reuses gigabytes already installed:  $RECSYS_ENV_ROOT/venv-<variant>-<hash>
#
#   RECSYS_VARIANT=cpu   (default) fbgemm-gpu-cpu kernels; runs anywhere
#   RECSYS_VARIANT=cuda  fbgemm-gpu (CUDA) kernels for machines with an NVIDIA driver
#   RECSYS_ENV_ROOT      where environments are cached (default ~/.cache/recsys_assets)
#   PYTHON               interpreter to build the venv from (default python3.11 or python3)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
variant="${RECSYS_VARIANT:-cpu}"
case "$variant" in
  cpu)  extra="torchrec-cpu" ;;
  cuda) extra="torchrec-cuda" ;;
  *) echo "bootstrap: RECSYS_VARIANT must be 'cpu' or 'cuda', got '$variant'" >&2; exit 2 ;;
esac
py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
root="${RECSYS_ENV_ROOT:-$HOME/.cache/recsys_assets}"
# Hash only what decides the installed packages (dependency lists + this script), so editing
# pytest or dagster settings in pyproject.toml does not trigger a reinstall.
spec_hash="$({ "$py" -c 'import sys,tomllib,json;p=tomllib.load(open(sys.argv[1],"rb"))["project"];print(json.dumps([p["dependencies"],p["optional-dependencies"]],sort_keys=True))' "$here/pyproject.toml"; cat "$here/scripts/bootstrap.sh"; } | sha256sum | cut -c1-12)"
venv="$root/venv-$variant-$spec_hash"

if [ ! -f "$venv/.complete" ]; then
  echo "bootstrap: creating $venv (first run installs several GB; later runs reuse it)" >&2
  rm -rf "$venv"
  mkdir -p "$root"
  "$py" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
  "${pip[@]}" --upgrade pip setuptools wheel >&2
  # Read the pins from pyproject.toml, so they are written down once.
  mapfile -t kernel_pins < <("$venv/bin/python" - "$here/pyproject.toml" "$extra" <<'PY'
import sys, tomllib
spec = tomllib.load(open(sys.argv[1], "rb"))
for req in spec["project"]["optional-dependencies"][sys.argv[2]]:
    print(req)
PY
)
  fbgemm_pin="${kernel_pins[0]}"; torchrec_pin="${kernel_pins[1]}"
  # 1. torch + the fbgemm kernels of the chosen variant.
  "${pip[@]}" "torch==2.14.1" "$fbgemm_pin" >&2
  # 2. torchrec without its declared fbgemm-gpu dependency.
  "${pip[@]}" --no-deps "$torchrec_pin" >&2
  # 3. everything else, plus test tools.
  "${pip[@]}" -e "$here[test]" >&2
  "$venv/bin/python" -c "import torchrec, fbgemm_gpu, streaming, pyspark, dagster, mlflow" >&2
  touch "$venv/.complete"
fi

# The venv is shared between clones: make sure the editable install points at THIS checkout.
if [ "$("$venv/bin/python" -c 'import recsys_assets,os;print(os.path.dirname(os.path.dirname(os.path.abspath(recsys_assets.__file__))))' 2>/dev/null)" != "$here" ]; then
  "$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e "$here" >&2
fi
echo "$venv"
