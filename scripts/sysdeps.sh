#!/usr/bin/env bash
# System packages the project uses: Fashion-MNIST (the embedded default's data) and, for the tests only,
# Chromium (the report's rendering test). Usage: sysdeps.sh [demo|test]
# Installs what is missing when it can (root + apt); otherwise says exactly what to run.
set -u
need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
if [ "${1:-test}" = test ] && [ -z "${LONGTAIL_SKIP_CHROMIUM:-}" ]; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/tmp/longtail-apt.log 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/tmp/longtail-apt.log 2>&1; } \
    || { echo "apt-get install ${need[*]} failed; see /tmp/longtail-apt.log" >&2; exit 1; }
else
  echo "missing system packages: ${need[*]}" >&2
  echo "install them with:  sudo apt-get install ${need[*]}" >&2
  echo "(or point longtail at Fashion-MNIST files with --data-dir; tests that need them are skipped)" >&2
fi
exit 0
