#!/usr/bin/env bash
# Checks the workspace's one MSRV (`rust-version` in the root Cargo.toml) without installing that
# toolchain (no `cargo +1.89` offline):
#   1. every workspace member declares the same rust-version (inherits the workspace's);
#   2. no package in Cargo.lock's resolved graph declares a newer rust-version;
#   3. clippy's `incompatible_msrv` lint, denied, over every target: it flags std APIs stabilised
#      after the crate's rust-version (clippy reads it from Cargo.toml).
# What it cannot catch: language features newer than the MSRV (only a real old toolchain does).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --locked --offline --filter-platform "$(rustc -vV | sed -n 's/^host: //p')" > target/msrv-metadata.json
python3 - target/msrv-metadata.json <<'PY'
import json, sys
meta = json.load(open(sys.argv[1]))
members = set(meta["workspace_members"])
pkgs = {p["id"]: p for p in meta["packages"]}
msrvs = {pkgs[m]["name"]: pkgs[m].get("rust_version") for m in members}
versions = set(msrvs.values())
if len(versions) != 1 or None in versions:
    sys.exit(f"FAIL: workspace members disagree on rust-version: {msrvs}")
msrv = versions.pop()
key = lambda v: (tuple(int(x) for x in v.split(".")) + (0, 0))[:3]
used = {n["id"] for n in meta["resolve"]["nodes"]}
newer = [f'{pkgs[i]["name"]} {pkgs[i]["version"]} needs {pkgs[i]["rust_version"]}'
         for i in used if pkgs[i].get("rust_version") and key(pkgs[i]["rust_version"]) > key(msrv)]
if newer:
    sys.exit(f"FAIL: dependencies newer than the MSRV {msrv}:\n  " + "\n  ".join(sorted(newer)))
print(f"ok: one MSRV {msrv} across {len(members)} members; no dependency needs more")
PY
cargo clippy --workspace --all-targets --all-features --locked --quiet -- -A clippy::all -D clippy::incompatible_msrv
echo "ok: clippy incompatible_msrv"
