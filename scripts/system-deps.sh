#!/usr/bin/env bash
# System packages the tests use for real: the Mosquitto broker with its command-line clients (mosquitto_sub
# watches a fleet, docs/fleet.md), and headless Chromium. apt's own output goes to a log, shown only on failure.
set -euo pipefail
need=()
command -v mosquitto >/dev/null || need+=(mosquitto)
command -v mosquitto_sub >/dev/null || need+=(mosquitto-clients)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
log=$(mktemp)
echo "installing ${need[*]} with apt-get (log: $log)"
if ! { $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "apt-get failed installing ${need[*]}: the lines above are the end of $log" >&2
    exit 1
fi
