#!/usr/bin/env bash
# Dependency audit, offline: fails when Cargo.lock holds a crate version with
# a known vulnerability (or a licence or source deny.toml does not allow),
# checked with cargo-deny against the snapshot of the RustSec advisory
# database in ../shared/advisory-db (read-only; see its SNAPSHOT file).
# Then proves the check bites: a throwaway Cargo.lock pinning smallvec 1.6.0
# (RUSTSEC-2021-0003, in the snapshot) must be reported, or this fails.
#   scripts/audit.sh                  # what .ci/run runs
#   MESH_ADVISORY_DB=/path/to/advisory-db scripts/audit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

# Pinned: builds with rustc 1.95 (rust-version 1.88), about 7-13 minutes on
# two cores the first time; kept in ~/.cargo/bin afterwards.
DENY_VERSION=0.20.2

SNAPSHOT=${MESH_ADVISORY_DB:-}
if [ -z "$SNAPSHOT" ]; then
    # The checkout's sibling in CI; two levels up from a worktree in wt/.
    for candidate in ../shared/advisory-db ../../shared/advisory-db; do
        if [ -d "$candidate/crates" ]; then SNAPSHOT=$candidate; break; fi
    done
fi
if [ -z "$SNAPSHOT" ] || [ ! -d "$SNAPSHOT/crates" ]; then
    echo "audit: no advisory database snapshot (looked for ../shared/advisory-db); set MESH_ADVISORY_DB" >&2
    exit 1
fi
head -n 1 "$SNAPSHOT/SNAPSHOT" 2>/dev/null | cut -c 1-120 || true

if ! cargo deny --version 2>/dev/null | grep -qx "cargo-deny $DENY_VERSION"; then
    echo "audit: installing cargo-deny $DENY_VERSION (only when missing)"
    # Its own temporary target directory: nothing of it lands in the build cache.
    env -u CARGO_TARGET_DIR cargo install --locked --quiet cargo-deny --version "$DENY_VERSION"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# cargo-deny opens a database as a git checkout named after its URL (the last
# path segment and a hash of the URL in deny.toml's db-urls); with fetching
# off it only reads it. If cargo-deny changes that naming, it says it cannot
# open this directory, and the audit fails rather than passing unchecked.
export MESH_ADVISORY_DB_ROOT="$WORK/dbs"
DB="$MESH_ADVISORY_DB_ROOT/advisory-db-3157b0e258782691"
mkdir -p "$DB"
cp -R "$SNAPSHOT/." "$DB/"
chmod -R u+w "$DB"
git -C "$DB" init -q -b main
git -C "$DB" add -A
git -C "$DB" -c user.name=audit -c user.email=audit@localhost -c commit.gpgsign=false \
    commit -q -m "advisory database snapshot"

# cargo-deny reads `cargo metadata` offline, which needs every crate of
# Cargo.lock on disk, other platforms' too (a build downloads only this
# one's): on a fresh machine they are fetched here, from the registry.
cargo fetch --locked --manifest-path "$REPO/Cargo.toml" --quiet

deny() { cargo deny --offline --locked --color never --config "$REPO/deny.toml" "$@"; }

echo "audit: Cargo.lock against the advisory database, licences, sources"
# Vulnerabilities and unsound code fail; unmaintained crates, notices and
# yanked versions are reported as warnings (deny.toml says why).
deny --manifest-path "$REPO/Cargo.toml" --workspace check \
    --warn unmaintained --warn notice --warn yanked

echo "audit: the same check must reject a known-vulnerable version"
CANARY="$WORK/canary"
mkdir -p "$CANARY/src"
: > "$CANARY/src/lib.rs"
cat > "$CANARY/Cargo.toml" <<'TOML'
[package]
name = "audit-canary"
version = "0.0.0"
edition = "2021"
license = "MIT"
publish = false

[dependencies]
# RUSTSEC-2021-0003: buffer overflow in SmallVec::insert_many, fixed in 1.6.1.
smallvec = "=1.6.0"

[workspace]
TOML
# The canary's manifest needs smallvec's (30 kB), fetched like the above.
(cd "$CANARY" && env -u CARGO_TARGET_DIR cargo fetch --quiet)
if deny --manifest-path "$CANARY/Cargo.toml" check advisories >"$WORK/canary.log" 2>&1; then
    cat "$WORK/canary.log" >&2
    echo "audit: cargo-deny did NOT report smallvec 1.6.0 (RUSTSEC-2021-0003): the audit is blind" >&2
    exit 1
fi
if ! grep -q "RUSTSEC-2021-0003" "$WORK/canary.log"; then
    cat "$WORK/canary.log" >&2
    echo "audit: cargo-deny failed on the canary, but not for RUSTSEC-2021-0003" >&2
    exit 1
fi
echo "audit: ok (the canary's RUSTSEC-2021-0003 was reported, as it must be)"
