#!/usr/bin/env bash
# Kept for the commands in old notes: the comparison is bench/compare/compare.py (see its
# --help and bench/compare/README.md). The old environment variables still work.
exec python3 "$(dirname "${BASH_SOURCE[0]}")/compare/compare.py" "$@"
