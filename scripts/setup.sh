#!/usr/bin/env bash
# Installs everything artifactfs needs on a Debian machine (as root) into ./.venv.
# Idempotent: a second run only checks. Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(python3 python3-dev python3-venv gcc pkg-config fuse3 libfuse3-dev attr)
if [ "${1:-}" = "--test" ]; then
  apt_packages+=(postgresql)  # the test suite runs the store tests against PostgreSQL too
fi
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
stamp=".venv/.installed${extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e ".${extras}" 2>&1 | grep -vE "is ignored|BuildBackendWarning" >&2 || true
  .venv/bin/python -c "import artifactfs" # fail here, not later, if the install did not take
  touch "$stamp"
fi
