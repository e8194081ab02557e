#!/usr/bin/env bash
# Install the headless browser used by `python -m avss_lib.testing.browser_check` (Debian/Ubuntu).
#
# Idempotent: does nothing when the browser is already there. Installs Debian's `chromium` package with
# apt-get (through sudo when not root). The Python driver is the `playwright` package from
# requirements.txt, launched on this binary: `playwright install` (a download) is never needed.
# Set AVSS_CHROMIUM to use a Chromium binary elsewhere; this script then only checks that it runs.
set -euo pipefail

CHROMIUM="${AVSS_CHROMIUM:-/usr/bin/chromium}"

fail() {
    echo "install_browser.sh: $*" >&2
    exit 1
}

if [[ ! -x "$CHROMIUM" ]]; then
    [[ "$CHROMIUM" == /usr/bin/chromium ]] ||
        fail "AVSS_CHROMIUM=$CHROMIUM is not an executable file: fix the path, or unset AVSS_CHROMIUM to install Debian's chromium"
    command -v apt-get >/dev/null ||
        fail "no apt-get here: install Chromium yourself and set AVSS_CHROMIUM=/path/to/chromium"
    SUDO=()
    if [[ "$(id -u)" -ne 0 ]]; then
        command -v sudo >/dev/null || fail "not root and no sudo: run 'apt-get install -y chromium' as root"
        SUDO=(sudo)
    fi
    echo "install_browser.sh: installing Debian's chromium with apt-get" >&2
    "${SUDO[@]}" apt-get update ||
        fail "'apt-get update' failed: check network access to the Debian mirrors, then rerun"
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y chromium ||
        fail "'apt-get install chromium' failed (on Ubuntu the package is a snap: install Google Chrome or a Chromium build and set AVSS_CHROMIUM)"
    [[ -x "$CHROMIUM" ]] || fail "apt-get finished but $CHROMIUM is still missing: set AVSS_CHROMIUM to the installed binary"
fi

version="$("$CHROMIUM" --version 2>/dev/null)" ||
    fail "$CHROMIUM does not run ('$CHROMIUM --version' failed): reinstall it with 'apt-get install --reinstall chromium'"
echo "install_browser.sh: ok: $CHROMIUM ($version)"
