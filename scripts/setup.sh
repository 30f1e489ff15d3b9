#!/bin/sh
# Installs the Debian packages the project needs, with apt-get: as root
# directly (containers, CI runners and cloud images often have no sudo),
# otherwise through sudo. Nothing is run when they are all installed already,
# so a machine without the network can rerun it.
#
#   sh scripts/setup.sh
#
# Exit codes: 0 installed (or already there); 2 neither root nor sudo; else
# apt-get's.
set -eu

# python3-venv: README's set-up makes a virtual environment; Debian's python3
# lacks venv without it. dataset-fashion-mnist: the quickstart's data (IDX files).
PACKAGES='python3-venv dataset-fashion-mnist'

missing=''
for package in $PACKAGES; do
  dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  as_root=''
elif command -v sudo >/dev/null 2>&1; then
  as_root='sudo'
else
  echo "error: installing$missing needs root, and there is no sudo: run $0 as root" >&2
  exit 2
fi
export DEBIAN_FRONTEND=noninteractive
$as_root apt-get update -qq
$as_root apt-get install -y -qq $missing
