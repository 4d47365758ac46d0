#!/usr/bin/env bash
# Installs Debian's `chromium` for the browser test (recsys_assets_tests/test_ui_browser.py), which drives it with
# Playwright through `executable_path` (no Playwright browser download).
# Does nothing when a chromium is already on PATH; never fails the caller: without root or apt the test skips
# and says why.
set -u
for b in chromium chromium-browser; do
  if command -v "$b" >/dev/null 2>&1; then
    exit 0
  fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser.sh: no apt-get here; the browser test will skip" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install_browser.sh: not root and no passwordless sudo; the browser test will skip" >&2
    exit 0
  fi
fi
echo "install_browser.sh: installing chromium with apt-get (once)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
       || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; }; then
  echo "install_browser.sh: apt-get could not install chromium; the browser test will skip" >&2
fi
exit 0
