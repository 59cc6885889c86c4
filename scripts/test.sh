#!/usr/bin/env bash
# The test command from the README: every test, with every feature.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --all-features "$@"
