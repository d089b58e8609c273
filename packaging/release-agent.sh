#!/usr/bin/env bash
# Builds the static uve-agent release artifact(s):
#   target/release-artifacts/uve-agent-<version>-x86_64-linux   (+ .sha256)
#   target/release-artifacts/uve-agent-<version>-aarch64-linux  (+ .sha256),
#     only when the aarch64-unknown-linux-gnu Rust target and a cross
#     linker (gcc-aarch64-linux-gnu) are installed; otherwise it says why
#     and skips it (packaging/README.md: "Static agent artifact").
# The binary is statically linked (glibc, +crt-static) and stripped, so it
# runs in any x86_64 Linux guest regardless of its libc. It must stay within
# 5 MiB stripped (UVE_AGENT_MAX_BYTES overrides the bar, for experiments).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
log() { printf 'release-agent: %s\n' "$*" >&2; }
out="$repo/target/release-artifacts"
mkdir -p "$out"
version=$(cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="uve-agent"))')

build() { # <rust target> <artifact arch> [linker]
  local target=$1 arch=$2 linker=${3:-}
  local env=(RUSTFLAGS='-C target-feature=+crt-static')
  if [ -n "$linker" ]; then
    local var="CARGO_TARGET_$(echo "$target" | tr 'a-z-' 'A-Z_')_LINKER"
    env+=("$var=$linker")
  fi
  log "building $target (static)"
  env "${env[@]}" cargo build -q --release --target "$target" \
    --target-dir "$repo/target/static" -p uve-agent --bin uve-agent
  local bin="$repo/target/static/$target/release/uve-agent"
  local art="$out/uve-agent-$version-$arch-linux"
  cp "$bin" "$art"
  # The release profile strips already; strip again for builds without it.
  local strip=strip
  [ "$arch" = aarch64 ] && strip=aarch64-linux-gnu-strip
  command -v "$strip" >/dev/null && "$strip" "$art"
  file -b "$art" | grep -q 'static' || { log "$art is not statically linked"; exit 1; }
  # The design's bar for the stripped agent (packaging/README.md, "Agent
  # size"): a dependency that breaks it fails the build here, not in a guest.
  local size max=${UVE_AGENT_MAX_BYTES:-5242880}
  size=$(stat -c %s "$art")
  if [ "$size" -gt "$max" ]; then
    log "$(basename "$art") is $size bytes, over the $max-byte bar (5 MiB); see packaging/README.md \"Agent size\" (cargo bloat --crates)"
    exit 1
  fi
  (cd "$out" && sha256sum "$(basename "$art")" >"$(basename "$art").sha256")
  log "$(basename "$art"): $size bytes, sha256 $(cut -c1-16 "$art.sha256")…"
}

build x86_64-unknown-linux-gnu x86_64

if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
  log "aarch64 skipped: the aarch64-unknown-linux-gnu Rust target is not installed (rustup target add downloads it from the Rust project, which this build environment cannot reach; Debian's own rustc is too old for edition 2024)"
elif ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  log "aarch64 skipped: no cross linker (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross)"
else
  build aarch64-unknown-linux-gnu aarch64 aarch64-linux-gnu-gcc
fi
ls -l "$out" >&2
