#!/usr/bin/env bash
# Installs Debian's Chromium (/usr/bin/chromium), the browser the real-browser tests drive through Playwright
# (tests/test_ranking_browser.py). Playwright's own browser download (`playwright install`) is never used: it fetches
# a browser from the internet. Idempotent: does nothing when /usr/bin/chromium exists.
#
#   CHROMIUM  the browser the tests use (default /usr/bin/chromium); only its presence is checked here
set -euo pipefail

chromium="${CHROMIUM:-/usr/bin/chromium}"
if [[ -x "$chromium" ]]; then
    exit 0
fi

if [[ "$(id -u)" -eq 0 ]]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    echo "browser: $chromium is missing and installing it needs root: run as root" \
         "\`apt-get update && apt-get install -y --no-install-recommends chromium\`, then run this again" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser: $chromium is missing and there is no apt-get here: install Chromium so that $chromium exists" >&2
    exit 1
fi

echo "browser: installing Debian's chromium with apt-get (about a minute)"
started=$SECONDS
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q
"${as_root[@]}" apt-get install -y -q --no-install-recommends chromium
if [[ ! -x "$chromium" ]]; then
    echo "browser: apt-get installed chromium but $chromium is still missing" >&2
    exit 1
fi
echo "browser: $("$chromium" --version 2>/dev/null || echo chromium) ready in $((SECONDS - started)) s"
