#!/usr/bin/env bash
# Regenerates docs/scaling/ (JSON and SVG plots) for docs/scaling.md:
# the pick-cost and subset benchmarks and the 1,000 x 1,000 fleet comparison.
# Takes 15-20 minutes on two busy cores in a debug build.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins --locked
bin="${CARGO_TARGET_DIR:-target}/debug/meshsim"
"$bin" bench --out docs/scaling | tee docs/scaling/bench.txt
"$bin" fleet --clients 1000 --servers 1000 --subset 16 --seconds 4 --capacity 1 \
    --out docs/scaling | tee docs/scaling/fleet.txt
