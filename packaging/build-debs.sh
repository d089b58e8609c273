#!/usr/bin/env bash
# Builds the Debian packages uve-host and uve-agent into target/debian/ and
# checks them with lintian (no overrides: both are clean). Needs cargo-deb (cargo install cargo-deb --locked),
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
log "release build (uve-host, uvectl, uve-docgen)"
cargo build -q --release --workspace
# Deterministic, small packages: the changelog date is the package's mtime
# (and the man pages' date).
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"

# Man pages and bash/zsh/fish completions of all three programs, from the
# clap definitions the binaries parse (uve-docgen is a build-time tool in
# neither package), into target/docgen/<program>/; the pages gzipped as
# Debian policy asks (-n: no name or time stamp, so reproducible).
docs="$repo/target/docgen"
log "man pages and completions (uve-docgen)"
target/release/uve-docgen "$docs" >&2
gzip -9nf "$docs"/*/man1/*.1

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
# Each package ships every page uve-docgen wrote for its programs, and
# their three completions, at the paths man and the shells look in.
check_docs() { # <deb> <program>...
  local deb=$1; shift
  local listing want missing=0
  listing=$(dpkg-deb -c "$deb" | awk '{print $6}')
  for p in "$@"; do
    want=()
    for page in "$docs/$p"/man1/*.1.gz; do want+=("./usr/share/man/man1/$(basename "$page")"); done
    want+=("./usr/share/bash-completion/completions/$p" "./usr/share/zsh/vendor-completions/_$p"
           "./usr/share/fish/vendor_completions.d/$p.fish")
    for f in "${want[@]}"; do
      grep -qxF "$f" <<<"$listing" || { log "$(basename "$deb") lacks $f"; missing=1; }
    done
    # The page the package installs is the one generated (gzip -9n).
    cmp -s <(dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/share/man/man1/$p.1.gz") "$docs/$p/man1/$p.1.gz" ||
      { log "$(basename "$deb"): usr/share/man/man1/$p.1.gz differs from $docs/$p/man1/$p.1.gz"; missing=1; }
    log "$(basename "$deb"): $p: ${#want[@]} files (man pages and completions)"
  done
  [ "$missing" = 0 ] || exit 1
}
check_docs "$host_deb" uve-host uvectl
check_docs "$agent_deb" uve-agent

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
  # --fail-on error,warning, and no overrides: a new finding fails the build.
  lintian --fail-on error,warning --display-info "$host_deb" "$agent_deb"
  log "lintian clean (no errors, no warnings, no overrides)"
fi
