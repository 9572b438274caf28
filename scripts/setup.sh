#!/usr/bin/env bash
# Set up boneage-worker on this machine: Debian packages (dcmtk, dicom3tools,
# orthanc) and a Python virtual environment in .venv with the project installed.
# Idempotent: a second run only checks.   Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

apt_packages=(dcmtk dicom3tools orthanc)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "==> installing Debian packages: ${missing[*]}"
  sudo_cmd=""
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [[ -x .venv/bin/python ]] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  # made without pip (uv, --without-pip): given one; half made (venv failed): made again
  if ! .venv/bin/python -m ensurepip --upgrade >/dev/null 2>&1; then
    echo "==> .venv has no pip and cannot make one: making it again"
    rm -rf .venv
  fi
fi
if [[ ! -x .venv/bin/python ]]; then
  if ! command -v "$python" >/dev/null 2>&1; then
    echo "$python not found: install Python 3.11 or newer, or set PYTHON to one" >&2
    exit 1
  fi
  echo "==> creating .venv with $("$python" --version)"
  if ! "$python" -m venv .venv; then
    rm -rf .venv
    echo "$python cannot make a virtual environment: on Debian, apt-get install python3-venv" >&2
    exit 1
  fi
fi
stamp=".venv/.installed${extras}"
installed() { [[ -f "$1" && ! pyproject.toml -nt "$1" ]]; }  # installed STAMP
# An install with the test extras holds the plain one.
if ! installed "$stamp" && ! { [[ -z $extras ]] && installed ".venv/.installed[test]"; }; then
  echo "==> installing boneage-worker${extras} into .venv (PyTorch is large: a few minutes the first time)"
  log=$(mktemp)
  if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip &&
         .venv/bin/python -m pip install --disable-pip-version-check -e ".${extras}"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "pip install failed; full log: $log" >&2
    exit 1
  fi
  rm -f "$log"
  touch "$stamp"
fi
echo "==> ready: $(.venv/bin/boneage-worker --version)"
