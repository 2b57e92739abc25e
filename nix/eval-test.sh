#!/usr/bin/env bash
# Evaluate nix/module.nix and nix/package.nix with lib.evalModules (nix/tests/eval.nix), then, where
# nginx and python3 are installed, check the balancer's nginx configuration with `nginx -t`.
#
# Usage: nix/eval-test.sh [PATH]
#   PATH, or $NIXPKGS_LIB: a checkout of nixpkgs or of nix-community/nixpkgs.lib (the folder that
#   holds lib/), or the lib/ folder itself. Needs only nix-instantiate (Debian: nix-bin), no network.
#
# Without a library (CI) it evaluates with nix/stand-in, our own small implementation of the `lib`
# functions nix/ uses, and fails when nix/ changed since the stand-in was last compared with the
# real library (the hashes in nix/stand-in/checked-against-real-lib). With a library it evaluates
# with both, compares what they decide (`--argstr output summary`: every option, the evaluated
# configs with their units, the package's arguments, the nginx configs; and nix/tests/stand-in.nix,
# the module system's behaviour beyond what nix/ uses today) and, when they agree,
# records the hashes of nix/'s files and the library's revision there: commit that file.
#
# The stand-in is the entry point for any evaluation here, e.g.
#   nix-instantiate --store dummy:// --eval --strict nix/tests/eval.nix --arg lib 'import ./nix/stand-in'
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
stand_in=$here/stand-in
record=$stand_in/checked-against-real-lib
lib_path=${1:-${NIXPKGS_LIB:-}}

fail() {
  echo "nix eval test FAILED: $1" >&2
  exit 1
}

command -v nix-instantiate >/dev/null || fail "nix-instantiate not found (apt-get install nix-bin)"
if [[ -n $lib_path ]]; then
  if [[ -f $lib_path/lib/default.nix ]]; then
    lib_path=$lib_path/lib
  elif [[ ! -f $lib_path/default.nix ]]; then
    fail "$lib_path holds neither lib/default.nix nor default.nix"
  fi
  lib_path=$(cd "$lib_path" && pwd)
fi

# Nothing here needs a store, the daemon or channels: the dummy store lets a non-root user run
# this where /nix/var belongs to root.
export NIX_PATH=
evaluate() {
  local lib=$1
  shift
  nix-instantiate --store dummy:// --eval --strict "$here/tests/eval.nix" --arg lib "import $lib" "$@"
}
# What a library decides, as JSON: eval.nix's summary and the module system's behaviour beyond
# today's module (nix/tests/stand-in.nix). Both force renamed options, whose use nixpkgs traces:
# stderr is kept for failures only.
results() {
  local lib=$1 side=$2
  for what in summary behaviour; do
    if [[ $what == summary ]]; then
      evaluate "$lib" --argstr output summary --json
    else
      nix-instantiate --store dummy:// --eval --strict --json "$here/tests/stand-in.nix" --arg lib "import $lib"
    fi >"$scratch/$side.$what.json" 2>"$scratch/$side.$what.err" ||
      { cat "$scratch/$side.$what.err" >&2; fail "the $what does not evaluate with the $side library"; }
  done
}

# "sha256  path" for nix/'s files and flake.nix (tracked or new, not ignored), the record itself
# left out, sorted by path.
nix_tree() (
  cd "$here/.."
  files=$(git ls-files --cached --others --exclude-standard -- nix flake.nix) ||
    fail "the hash of nix/ needs a git checkout (git ls-files)"
  echo "$files" | { grep -vxF "nix/stand-in/$(basename "$record")" || true; } | LC_ALL=C sort -u |
    while IFS= read -r file; do
      if [[ -f $file ]]; then sha256sum -- "$file"; fi
    done
)
# The record's file lines, and what differs from them in the listing $1: "changed|new|removed: path".
recorded_tree() { grep -E '^[0-9a-f]{64}  ' "$record" 2>/dev/null || true; }
tree_changes() {
  awk 'NR == FNR { was[$2] = $1; next } { now[$2] = $1 }
    END {
      for (f in now) if (!(f in was)) print "new: " f; else if (was[f] != now[f]) print "changed: " f
      for (f in was) if (!(f in now)) print "removed: " f
    }' <(recorded_tree) <(printf '%s\n' "$1") | LC_ALL=C sort -k2
}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

if [[ -z $lib_path ]]; then
  echo "nix eval: nixpkgs' lib not given, evaluating with our stand-in (nix/stand-in)"
  evaluate "$stand_in"
  results "$stand_in" stand-in
  current=$(nix_tree)
  changes=$(tree_changes "$current")
  if [[ -n $changes || -z $(recorded_tree) ]]; then
    fail "nix/ changed since the stand-in was last checked against nixpkgs' lib (nix/stand-in/$(basename "$record")):
$(sed 's/^/  /' <<<"${changes:-no record}")
With nixpkgs' lib at hand (git clone https://github.com/nix-community/nixpkgs.lib /path/to/nixpkgs.lib), run
  nix/eval-test.sh /path/to/nixpkgs.lib
and commit nix/stand-in/$(basename "$record")."
  fi
  echo "nix eval: nix/ is as it was when the stand-in last agreed with nixpkgs' lib ($(sed -n 's/^nixpkgs-lib //p' "$record"))"
  nginx_lib=$stand_in
else
  echo "nix eval: with nixpkgs' lib ($lib_path) and with our stand-in"
  evaluate "$lib_path"
  evaluate "$stand_in"
  results "$lib_path" real
  results "$stand_in" stand-in
  for what in summary behaviour; do
    if ! cmp -s "$scratch/real.$what.json" "$scratch/stand-in.$what.json"; then
      if command -v python3 >/dev/null; then
        for side in real stand-in; do
          python3 -m json.tool --sort-keys "$scratch/$side.$what.json" >"$scratch/$side.$what.pretty"
        done
        diff -u "$scratch/real.$what.pretty" "$scratch/stand-in.$what.pretty" | head -200 >&2 || true
      fi
      fail "the stand-in's $what differs from nixpkgs' lib's (diff above: - nixpkgs' lib, + stand-in); fix nix/stand-in"
    fi
  done
  revision=$(git -C "$lib_path" rev-parse HEAD 2>/dev/null || echo "${NIXPKGS_LIB_REV:-unknown revision}")
  version=$(cat "$lib_path/.version" 2>/dev/null || echo "?")
  {
    echo "# Written by nix/eval-test.sh when nix/stand-in and nixpkgs' lib gave the same results for"
    echo "# nix/tests/eval.nix (checks and summary) and nix/tests/stand-in.nix. CI fails when the hash"
    echo "# of a file of nix/ or flake.nix no longer matches (or one is added or removed)."
    echo "nixpkgs-lib $revision (lib/.version $version)"
    echo "nix-tree-sha256 $(nix_tree | sha256sum | cut -d' ' -f1)"
    nix_tree
  } >"$record"
  echo "nix eval: the stand-in agrees with nixpkgs' lib ($(cat "$scratch"/real.*.json | wc -c) bytes of JSON); recorded in nix/stand-in/$(basename "$record")"
  nginx_lib=$lib_path
fi

# The balancer's nginx configuration, as the module generates it, must pass `nginx -t`.
nginx=$(command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true)
command -v python3 >/dev/null || nginx=""  # unquotes the evaluated string
if [[ -z $nginx ]]; then
  echo "nginx -t of the balancer configuration SKIPPED: nginx or python3 not found" >&2
  exit 0
fi
for variant in nginx nginx-allowlisted; do
  {
    echo "pid $scratch/nginx.pid; error_log stderr; events {}"
    evaluate "$nginx_lib" --argstr output "$variant" --json | python3 -c 'import json, sys; print(json.load(sys.stdin))'
  } >"$scratch/$variant.conf"
  "$nginx" -q -t -p "$scratch" -e stderr -c "$scratch/$variant.conf"
  echo "nginx -t: the $variant balancer configuration is valid"
done
