#!/usr/bin/env bash
# Each backend alone, as a user installs it: a fresh virtual environment with only `.[torch]` (torch==2.13.0 first, the
# local CPU wheel) and one with only `.[jax]`, plus pytest, each running that backend's fresh-process tests. Part of
# the README's test command, so .ci/run runs it after the suite (which leaves those two files to it). The environments
# are removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
envs=$(mktemp -d "${TMPDIR:-/tmp}/contentv-extras.XXXXXX")
trap 'rm -rf "$envs"' EXIT
for extra in torch jax; do
  start=$SECONDS
  python -m venv "$envs/$extra"
  py="$envs/$extra/bin/python"
  if [ "$extra" = torch ]; then "$py" -m pip install -q torch==2.13.0; fi
  "$py" -m pip install -q -e ".[$extra]" pytest
  echo "run_extras: .[$extra] environment installed in $((SECONDS - start)) s"
  other=$([ "$extra" = torch ] && echo jax || echo torch)
  if "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$other') is None)"; then
    echo "run_extras: the .[$extra] environment has $other installed; the extra does not stand alone" >&2
    exit 1
  fi
  "$py" -m pytest -p no:cacheprovider "tests/fresh/test_fresh_$extra.py"  # -q comes from pyproject
done
