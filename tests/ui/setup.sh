#!/bin/sh
# Prepares what the web UI test (pytest tests/ui) needs; safe to re-run.
#  - Debian's Chromium (/usr/bin/chromium) and Node with npm: apt-get install when root, else one line
#    says what is missing and the test skips with that reason.
#  - playwright-core from npm into tests/ui/node_modules (pinned by package-lock.json). It never downloads
#    a browser: the test drives Debian's Chromium.
# Exits 0 when everything is there or, not being root, it could install nothing (it says so and the test
# skips); 1 when an install failed, or anything is missing with CI=true.
set -u
here=$(cd "$(dirname "$0")" && pwd)
status=0

can_apt() { [ "${MAILROOM_INSTALL:-1}" != 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }

# Installs the Debian packages given when missing and possible; returns 1 if any stays missing.
need_debs() {
    absent=""
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || absent="$absent $p"
    done
    [ -z "$absent" ] && return 0
    if can_apt; then
        if [ -z "${apt_updated:-}" ]; then
            apt-get update -q >/dev/null 2>&1 || true
            apt_updated=1
        fi
        echo "ui setup: apt-get install -y$absent"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $absent >/dev/null && return 0
    fi
    for p in $absent; do echo "ui setup: missing Debian package $p (apt-get install $p as root)"; done
    # Not root (or no apt): nothing to try; the UI test skips with this reason (fails with CI=true).
    if ! can_apt && [ "${CI:-}" != true ]; then
        echo "ui setup: skipped: cannot install$absent without root; tests/ui will skip"
        skipped=1
        return 0
    fi
    return 1
}

if [ ! -x /usr/bin/chromium ]; then
    if command -v dpkg-query >/dev/null 2>&1; then
        need_debs chromium || status=1
    else
        echo "ui setup: missing /usr/bin/chromium (Debian's chromium package)"; status=1
    fi
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if command -v dpkg-query >/dev/null 2>&1; then
        need_debs nodejs npm || status=1
    else
        echo "ui setup: missing node and npm (Node 18+)"; status=1
    fi
fi
if command -v npm >/dev/null 2>&1; then
    if [ -f "$here/node_modules/playwright-core/package.json" ] &&
        grep -q "\"version\": \"$(sed -n 's/.*"playwright-core": "\(.*\)".*/\1/p' "$here/package.json")\"" \
            "$here/node_modules/playwright-core/package.json"; then
        :
    elif (cd "$here" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent); then
        :
    else
        echo "ui setup: npm ci failed in tests/ui (playwright-core)"; status=1
    fi
fi
if [ "$status" = 0 ] && [ -z "${skipped:-}" ]; then
    echo "ui setup: $(/usr/bin/chromium --version 2>/dev/null | head -n 1), node $(node --version), playwright-core $(sed -n 's/.*"version": "\(.*\)".*/\1/p' "$here/node_modules/playwright-core/package.json" | head -n 1)"
fi
exit $status
