#!/usr/bin/env bash
# System packages the tests use for real: the Mosquitto broker and headless Chromium.
set -euo pipefail
need=()
command -v mosquitto >/dev/null || need+=(mosquitto)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
