#!/usr/bin/env bash
# Builds every libFuzzer target in fuzz/ on stable Rust (the flags cargo-fuzz would pass, see fuzz/README.md;
# no nightly, no cargo-fuzz), replays fuzz/regressions/<target>/*, then fuzzes each target for
# FUZZ_SECONDS (default 60) from its corpus in fuzz/corpus/<target>. Exits non-zero on any crash.
# Used by scripts/test-all.sh (phase "fuzz"); long runs and their figures are in SECURITY.md.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-60}"
triple=x86_64-unknown-linux-gnu
# target:max_len
targets=(codec:4096 frames:8192 store_recovery:16384)
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
export CARGO_INCREMENTAL=0
names=()
for t in "${targets[@]}"; do names+=(--bin "${t%%:*}"); done
cargo build --release --locked --target "$triple" "${names[@]}"
for t in "${targets[@]}"; do
  name="${t%%:*}" max_len="${t##*:}"
  bin="target/$triple/release/$name"
  if compgen -G "regressions/$name/*" >/dev/null; then
    echo "== $name: replaying regressions/$name"
    "$bin" regressions/"$name"/*
  fi
  mkdir -p "corpus/$name" "artifacts/$name"
  echo "== $name: fuzzing for $seconds s"
  "$bin" "corpus/$name" -max_len="$max_len" -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix="artifacts/$name/" 2>&1 | grep -Ev '^#[0-9]+ +(NEW|REDUCE|pulse)'
done
