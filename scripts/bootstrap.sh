#!/usr/bin/env bash
# Creates (or updates) this clone's virtual environment, .venv, from uv.lock and prints its path on the last line.
#
# Each clone has its own .venv, so two clones never run each other's code. uv's cache (~/.cache/uv) makes a
# second clone's environment a matter of seconds: packages are linked from it, not downloaded again.
#
#   RECSYS_VARIANT=cpu   (default) fbgemm-gpu-cpu kernels; runs anywhere
#   RECSYS_VARIANT=cuda  fbgemm-gpu (CUDA) kernels for machines with an NVIDIA driver
#   RECSYS_ENV_ROOT      where the pinned uv is installed when none is on PATH (default ~/.cache/recsys_assets)
#   PYTHON               interpreter to build the venv from (default python3.11 or python3)
#   bootstrap.sh --lock         re-resolves uv.lock after a change to pyproject.toml (commit it)
#   bootstrap.sh --check-lock   only checks that uv.lock matches pyproject.toml (exit 1 when stale)
#
# This machine's pip settings (pip.conf / PIP_* variables: index-url, extra-index-url, find-links, constraint)
# are handed to uv, which does not read them, so both resolve from the same places.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
uv_version="0.13.9"
variant="${RECSYS_VARIANT:-cpu}"
case "$variant" in
  cpu|cuda) ;;
  *) echo "bootstrap: RECSYS_VARIANT must be 'cpu' or 'cuda', got '$variant'" >&2; exit 2 ;;
esac
py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
root="${RECSYS_ENV_ROOT:-$HOME/.cache/recsys_assets}"

# The pinned uv: the one on PATH when it is that version, else a private install from the package index.
uv="$(command -v uv || true)"
if [ -z "$uv" ] || [ "$("$uv" --version | cut -d' ' -f2)" != "$uv_version" ]; then
  uv="$root/uv-$uv_version/bin/uv"
  if [ ! -x "$uv" ]; then
    echo "bootstrap: installing uv $uv_version into $root/uv-$uv_version" >&2
    rm -rf "$root/uv-$uv_version"
    "$py" -m venv "$root/uv-$uv_version"
    "$root/uv-$uv_version/bin/python" -m pip install --disable-pip-version-check -q "uv==$uv_version" >&2
  fi
fi

# pip's effective settings, as uv environment variables (lines of NAME=VALUE).
pip_settings="$("$py" - <<'PY' 2>/dev/null || true
import subprocess, sys
out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings = {}
for line in out.splitlines():  # e.g. global.find-links='/opt/wheels'  or  :env:.find-links='/opt/wheels'
    key, _, value = line.partition("=")
    scope, _, name = key.rpartition(".")
    if scope == ":env:" or name not in settings:  # environment variables override the files
        settings[name] = value.strip("'\"")
uv_names = {"index-url": "UV_DEFAULT_INDEX", "extra-index-url": "UV_INDEX", "find-links": "UV_FIND_LINKS",
            "constraint": "UV_CONSTRAINT"}
for name, uv_name in uv_names.items():
    if settings.get(name):
        print(f"{uv_name}={' '.join(settings[name].split())}")
if settings.get("extra-index-url") or settings.get("find-links"):
    print("UV_INDEX_STRATEGY=unsafe-best-match")  # pip picks the best match across all indexes
PY
)"
while IFS= read -r setting; do
  [ -n "$setting" ] && export "${setting?}"
done <<<"$pip_settings"
export UV_PYTHON="$py" UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT="$here/.venv"

case "${1:-}" in
  --lock) exec "$uv" lock --project "$here" ;;
  --check-lock) exec "$uv" lock --check --project "$here" -q ;;
esac

# --locked: a uv.lock that no longer matches pyproject.toml is an error (run `uv lock`), never a silent re-resolve.
if ! "$uv" sync --locked --project "$here" --extra "torchrec-$variant" --extra test -q >&2; then
  echo "bootstrap: 'uv sync --locked' failed. If pyproject.toml changed, update the lock with" >&2
  echo "  bash scripts/bootstrap.sh --lock   and commit uv.lock" >&2
  exit 1
fi

# uv sync does not take pip's constraint files: check that the locked versions satisfy this machine's.
if [ -n "${UV_CONSTRAINT:-}" ]; then
  "$here/.venv/bin/python" - $UV_CONSTRAINT <<'PY' >&2
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
problems = []
for path in sys.argv[1:]:
    for number, line in enumerate(open(path), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            continue
        if not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{path}:{number}: '{line}' excludes the locked {req.name} {installed}")
if problems:
    sys.exit("bootstrap: uv.lock breaks this machine's pip constraints:\n  " + "\n  ".join(problems))
PY
fi
# uv links files from its cache without compiling them. Where PYTHONDONTWRITEBYTECODE is set, every process
# would then recompile torch, torchrec and dagster on import (~35 s): compile what the project imports, once per
# lock. The compiled files are kept beside uv's cache and linked into the next clone's .venv: its sources are
# links to the same cached files (same size and mtime), so the bytecode is valid there too. Where they are not
# (uv's cache rebuilt or moved), the seed is stale for these sources: it is compiled again from them.
lock_hash="$(sha256sum "$here/uv.lock" | cut -c1-12)"
marker="$here/.venv/.bytecode-$lock_hash"
if [ ! -f "$marker" ]; then
  seed="$root/bytecode-$variant-$lock_hash"
  site="$("$here/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  link_bytecode() { "$here/.venv/bin/python" "$here/scripts/link_bytecode.py" "$@"; }
  stale=1
  if [ -f "$seed/.complete" ]; then
    # only the files compiled from these very sources: a seed of another uv cache's copies is stale here
    stale="$(link_bytecode "$seed" "$site" --match-sources)"
  fi
  if [ "$stale" != 0 ]; then
    warm() { env -u PYTHONDONTWRITEBYTECODE "$here/.venv/bin/python" -c "import $1" >/dev/null 2>&1; }
    warm torch & warm "dagster, dagster_pyspark, mlflow, pyspark, optuna, pandas, pyarrow" & wait
    warm "torchrec, fbgemm_gpu" & warm "streaming, faiss" & wait
    rm -rf "$seed" && link_bytecode "$site" "$seed" >/dev/null && touch "$seed/.complete"
  fi
  env -u PYTHONDONTWRITEBYTECODE "$here/.venv/bin/python" -m compileall -q "$here/recsys_assets" >/dev/null || true
  rm -f "$here"/.venv/.bytecode-* && touch "$marker"
fi
echo "$here/.venv"
