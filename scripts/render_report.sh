#!/usr/bin/env bash
# Render a report.html in headless Chromium (Debian's `chromium` package) and save a screenshot, to check
# that it opens offline and reads well on a laptop screen.
# Usage: scripts/render_report.sh RUN_DIR/report.html [OUT.png] [WIDTHxHEIGHT]
set -euo pipefail
report=$(realpath "$1")
out=${2:-${report%.html}.png}
size=${3:-1366,2600}
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
  echo "chromium not found: install it (Debian: apt-get install chromium)" >&2
  exit 1
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size="${size/x/,}" --screenshot="$(realpath -m "$out")" "file://$report" >/dev/null 2>&1
echo "$out"
