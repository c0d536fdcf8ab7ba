#!/usr/bin/env bash
# mypy and import-linter over the package. Both need to see the import package `berth`, which the
# source tree only becomes through setuptools' package-dir mapping, so build a tree of symlinks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
tree=build/typecheck
rm -rf "$tree" && mkdir -p "$tree/berth"
for folder in core plugins runtimes snapshotters client conformance; do
    ln -s "../../../$folder" "$tree/berth/$folder"
done
(cd "$tree" && "$PYTHON" -m mypy --config-file ../../pyproject.toml -p berth)
(cd "$tree" && PYTHONPATH=. "$PYTHON" -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())" --config ../../pyproject.toml)
