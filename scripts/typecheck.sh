#!/usr/bin/env bash
# mypy and import-linter over the package. Both need to see the import package `berth`, which the
# source tree only becomes through setuptools' package-dir mapping, so build a tree of symlinks in a
# fresh temporary directory (concurrent runs never share one).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
repo=$(pwd)
tree=$(mktemp -d /tmp/berth-typecheck.XXXXXX)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/berth"
for folder in core plugins runtimes snapshotters client conformance; do
    ln -s "$repo/$folder" "$tree/berth/$folder"
done
(cd "$tree" && "$PYTHON" -m mypy --config-file "$repo/pyproject.toml" --cache-dir "$repo/.mypy_cache" -p berth)
(cd "$tree" && PYTHONPATH=. "$PYTHON" -c \
    "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())" \
    --config "$repo/pyproject.toml")
