#!/usr/bin/env bash
# The screenshot in docs/tracking.md: TensorBoard's Scalars view of a tracked run, drawn by headless Chromium.
# Usage: scripts/docs_tensorboard_screenshot.sh RUN_DIR [OUT.png] [TAG_FILTER]
#   RUN_DIR: a `longtail mine` / `longtail demo` run made with `--set track=tensorboard` (its tracking/ folder);
#   the docs' image came from `longtail demo --quick --set track=tensorboard --out RUN_DIR`.
set -euo pipefail
run=${1:?usage: $0 RUN_DIR [OUT.png] [TAG_FILTER]}
out=${2:-docs/img/tensorboard_scalars.png}
filter=${3:-mining}
port=${PORT:-6006}
venv=$(cd "$(dirname "$0")/.." && pwd)/.venv
[ -d "$run/tracking" ] || { echo "no $run/tracking: run the job with --set track=tensorboard" >&2; exit 2; }
command -v chromium >/dev/null || { echo "chromium is missing: bash scripts/sysdeps.sh test" >&2; exit 2; }
"$venv/bin/tensorboard" --logdir "$run/tracking" --port "$port" --host 127.0.0.1 >/tmp/longtail-tensorboard.log 2>&1 &
tb=$!
trap 'kill "$tb" 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/" >/dev/null && break; sleep 1; done
profile=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run --user-data-dir="$profile" \
  --window-size=1400,1000 --virtual-time-budget=15000 --screenshot="$out" \
  "http://127.0.0.1:$port/?darkMode=false#scalars&tagFilter=$filter" >/dev/null 2>&1
rm -rf "$profile"
echo "wrote $out"
