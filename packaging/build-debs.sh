#!/usr/bin/env bash
# Builds the Debian packages uve-host and uve-agent into target/debian/ and
# checks them with lintian (accepted findings are overridden, with reasons,
# in packaging/lintian/). Needs cargo-deb (cargo install cargo-deb --locked),
# dpkg-dev and lintian (apt).
#
#   packaging/build-debs.sh            build both, run lintian (fails on E:/W:)
#   packaging/build-debs.sh --no-lint  build only
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
lint=1
[ "${1:-}" = "--no-lint" ] && lint=0
log() { printf 'build-debs: %s\n' "$*" >&2; }
command -v cargo-deb >/dev/null 2>&1 || { log "cargo-deb missing: cargo install cargo-deb --locked"; exit 1; }

out="$repo/target/debian"
mkdir -p "$out"

# uve-host: the ordinary release build (the same command as CI's release
# step, so it is a no-op there), packaged without rebuilding.
log "release build (uve-host, uvectl)"
cargo build -q --release --workspace
# Deterministic, small packages: the changelog date is the package's mtime.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
log "packaging uve-host"
cargo deb -q -p uve-host --no-build --no-strip --output "$out/"

# uve-agent: the same release build, dynamically linked, so that libc's NSS
# resolves directory users (SSSD, winbind, LDAP); the static build is the
# release artifact (release-agent.sh).
if ! file -b target/release/uve-agent | grep -q 'dynamically linked'; then
  log "target/release/uve-agent is not dynamically linked: the package's agent could not use NSS"; exit 1
fi
log "packaging uve-agent"
cargo deb -q -p uve-agent --no-build --no-strip --output "$out/"

version=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="uve-agent"))')
host_deb=$(ls -t "$out"/uve-host_"$version"*_amd64.deb | head -1)
agent_deb=$(ls -t "$out"/uve-agent_"$version"*_amd64.deb | head -1)
# Stable names for scripts (bake-image.sh, the baked-image test).
ln -sfn "$(basename "$host_deb")" "$out/uve-host.deb"
ln -sfn "$(basename "$agent_deb")" "$out/uve-agent.deb"
for d in "$host_deb" "$agent_deb"; do
  log "$(basename "$d"): $(du -k "$d" | cut -f1) KiB"
done

# Hardening guard: the host unit's exposure (systemd-analyze security,
# offline) must stay where packaging/README.md says it is (1.4 "OK").
if command -v systemd-analyze >/dev/null 2>&1; then
  score=$(systemd-analyze security --offline=true packaging/systemd/uve-host.service 2>/dev/null | tail -1)
  log "uve-host.service: ${score#→ }"
  systemd-analyze security --offline=true --threshold=20 packaging/systemd/uve-host.service >/dev/null 2>&1 ||
    { log "uve-host.service exposure above 2.0: a hardening option was lost"; exit 1; }
else
  log "systemd-analyze missing (apt-get install systemd): hardening score not checked"
fi

if [ "$lint" = 1 ]; then
  command -v lintian >/dev/null 2>&1 || { log "lintian missing: apt-get install lintian"; exit 1; }
  log "lintian"
  # --fail-on error,warning: accepted findings must carry an override
  # (packaging/lintian/, shipped in the packages; --show-overrides would
  # count them as failures, so they are listed from the files instead).
  lintian --fail-on error,warning --display-info "$host_deb" "$agent_deb"
  log "accepted (overridden): $(grep -hv '^#' packaging/lintian/* | sed 's/ \[.*//' | sort -u | paste -sd';' | sed 's/;/; /g')"
  log "lintian clean (errors and warnings: none beyond the overrides)"
fi
