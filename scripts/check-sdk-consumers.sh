#!/usr/bin/env bash
# Builds two scratch crates outside the workspace that depend on the SDK (`crates/mailroom`) by path,
# as an application would:
#   - `defaults`: default features (embedded broker + AMQP);
#   - `amqp-only`: `default-features = false, features = ["amqp"]`, which must not pull in the broker
#     (`mailroom-broker`, and with it the exact `amq-protocol` pin);
#   - `sqlite`: `default-features = false, features = ["amqp", "sqlite"]`, the SQLite outbox without
#     PostgreSQL (no `sqlx-postgres` in its tree).
# Then checks that `cargo package --workspace --no-verify` succeeds (versions on every path dependency,
# metadata complete). `cargo check` only: cheap. Run from anywhere; CI runs it from scripts/test-all.sh.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
# The workspace's target dir: the dependencies checked by clippy there are reused (same versions).
export CARGO_TARGET_DIR="$root/target"

make_crate() { # name, dependency line
  mkdir -p "$scratch/$1/src"
  cat > "$scratch/$1/Cargo.toml" <<TOML
[package]
name = "$1"
version = "0.0.0"
edition = "2021"
publish = false

# Not a member of any workspace above the scratch directory.
[workspace]

[dependencies]
$2
tokio = { version = "1", features = ["rt", "macros"] }
TOML
  # The workspace's lock file, so the check resolves offline to the versions CI already has.
  cp "$root/Cargo.lock" "$scratch/$1/Cargo.lock"
}

make_crate defaults "mailroom = { path = \"$root/crates/mailroom\" }"
cat > "$scratch/defaults/src/main.rs" <<'RS'
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bus = mailroom::Bus::embedded()?;
    bus.send("jobs", "hello".to_string()).await?;
    let _amqp: Option<mailroom::Amqp> = None;
    Ok(())
}
RS

make_crate amqp-only "mailroom = { path = \"$root/crates/mailroom\", default-features = false, features = [\"amqp\"] }"
cat > "$scratch/amqp-only/src/main.rs" <<'RS'
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bus = mailroom::Bus::new(mailroom::Amqp::connect_url("amqp://guest:guest@127.0.0.1:5672/%2F").await?);
    bus.send("jobs", "hello".to_string()).await?;
    Ok(())
}
RS

make_crate sqlite "mailroom = { path = \"$root/crates/mailroom\", default-features = false, features = [\"amqp\", \"sqlite\"] }"
cat > "$scratch/sqlite/src/main.rs" <<'RS'
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = std::env::temp_dir().join("consumer-check.db");
    let outbox = mailroom::sqlite::SqliteOutbox::new(mailroom::sqlite::open(&file).await?, &file, "outbox")?;
    outbox.migrate().await?;
    Ok(())
}
RS

for c in defaults amqp-only sqlite; do
  echo "== cargo check: SDK consumer '$c'"
  (cd "$scratch/$c" && cargo check --quiet --offline)
done

echo "== amqp-only: no broker in the dependency tree"
if (cd "$scratch/amqp-only" && cargo tree --offline --prefix none -e normal | grep -E '^mailroom-broker '); then
  echo "FAIL: mailroom-broker is a dependency of an AMQP-only application" >&2
  exit 1
fi
lapin_req="$(grep -E '^lapin *=' "$root/crates/mailroom/Cargo.toml")"
if grep -q '"=' <<<"$lapin_req"; then
  echo "FAIL: the SDK pins lapin exactly: $lapin_req" >&2
  exit 1
fi

echo "== sqlite: no PostgreSQL driver in the dependency tree"
if (cd "$scratch/sqlite" && cargo tree --offline --prefix none -e normal | grep -E '^sqlx-postgres '); then
  echo "FAIL: sqlx-postgres is a dependency of a SQLite-only application" >&2
  exit 1
fi

echo "== defaults: the broker is there"
(cd "$scratch/defaults" && cargo tree --offline --prefix none -e normal | grep -qE '^mailroom-broker ') \
  || { echo "FAIL: default features lack the embedded broker" >&2; exit 1; }

echo "== cargo package --workspace --no-verify"
(cd "$root" && cargo package --workspace --no-verify --offline --allow-dirty --quiet)
echo "ok: SDK consumers build; the workspace packages"
