#!/usr/bin/env bash
# Debian packages the project needs: espeak-ng (speech data, phonemes), sox (audio checks), and
# chromium + chromium-driver (the browser tests of the voice-chat page, tests/test_web_page.py), and the
# shared libraries open3d's wheel loads (libusb, libGL, libgomp; point clouds, the 3D model).
# Installs them when missing (as root, or through sudo); otherwise says what to run.
set -euo pipefail
missing=()
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
command -v sox >/dev/null 2>&1 || missing+=(sox)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
for lib in libusb-1.0.so.0:libusb-1.0-0 libGL.so.1:libgl1 libgomp.so.1:libgomp1; do
  ldconfig -p | grep -q "${lib%%:*}" || missing+=("${lib##*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing system packages: ${missing[*]}"
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1; then
  SUDO="sudo"
else
  echo "error: missing ${missing[*]}; install them with: apt-get install -y ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
