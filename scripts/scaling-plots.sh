#!/usr/bin/env bash
# Regenerates docs/scaling/ (JSON and SVG plots) for docs/scaling.md:
# the pick-cost and subset benchmarks and the 1,000 x 1,000 fleet comparison.
# Takes 15-20 minutes on two busy cores in a debug build.
# PROFILE=release builds and runs the release binary (the goals' numbers);
# QUICK=1 runs `meshsim bench --quick` (pick cost at 10 / 1,000 / 10,000).
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${PROFILE:-debug}"
if [ "$profile" = release ]; then
    cargo build --release --workspace --bins --locked
else
    cargo build --workspace --bins --locked
fi
bin="${CARGO_TARGET_DIR:-target}/$profile/meshsim"
"$bin" bench ${QUICK:+--quick} --out docs/scaling | tee docs/scaling/bench.txt
"$bin" fleet --clients 1000 --servers 1000 --subset 16 --seconds 4 --capacity 1 \
    --out docs/scaling | tee docs/scaling/fleet.txt
