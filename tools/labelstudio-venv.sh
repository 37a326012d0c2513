#!/usr/bin/env bash
# Builds a separate virtual environment holding a real Label Studio, for the end-to-end test
# of segany's Label Studio ML backend (tests/integrations/test_labelstudio_real.py). Label
# Studio never enters segany's own venv: it pins Django, its own numpy range and a hundred
# other packages.
# Pins: label-studio 1.23.2 (the version the test was written against) and sentry-sdk<3
# (with sentry-sdk 3.0 `label-studio start` stops with "Unknown option 'send_default_pii'").
# Usage: labelstudio-venv.sh [DIR]   (default: ~/.cache/segany-labelstudio/venv)
# Prints the path of the venv's python on its last line. The first build takes a few minutes
# and about 1 GB; later calls only check the imports.
set -euo pipefail
dir=${1:-$HOME/.cache/segany-labelstudio/venv}
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"  # one build at a time (parallel test workers may both ask)
flock 9
if [ ! -x "$dir/bin/python" ] || ! "$dir/bin/python" -c "import label_studio, label_studio_sdk.converter.brush" 2>/dev/null; then
  [ -x "$dir/bin/python" ] || python3 -m venv "$dir"
  echo "labelstudio-venv: installing label-studio==1.23.2 into $dir (a few minutes, ~1 GB)" >&2
  "$dir/bin/pip" install -q --disable-pip-version-check --upgrade pip >&2
  "$dir/bin/pip" install --disable-pip-version-check --progress-bar off \
    "label-studio==1.23.2" "sentry-sdk<3" 2>&1 | grep -E '^(Collecting|Successfully)' | sed 's/^/labelstudio-venv: /' >&2 || true
  "$dir/bin/python" -c "import label_studio, label_studio_sdk.converter.brush" >&2
fi
echo "$dir/bin/python"
