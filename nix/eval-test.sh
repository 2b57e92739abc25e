#!/usr/bin/env bash
# Evaluate nix/module.nix and nix/package.nix with lib.evalModules (nix/tests/eval.nix), then, where
# nginx and python3 are installed, check the balancer's nginx configuration with `nginx -t`.
#
# Usage: nix/eval-test.sh [PATH]
#   PATH, or $NIXPKGS_LIB: a checkout of nixpkgs or of nix-community/nixpkgs.lib (the folder that
#   holds lib/), or the lib/ folder itself. Needs only nix-instantiate (Debian: nix-bin), no network.
# Without a library it evaluates with nix/stand-in, our own small implementation of the `lib`
# functions nix/ uses (what CI does). The stand-in is the entry point for any evaluation here:
#   nix-instantiate --store dummy:// --eval --strict nix/tests/eval.nix --arg lib 'import ./nix/stand-in'
#   nix-instantiate --store dummy:// --eval --strict -E 'import ./nix/package.nix { lib = import ./nix/stand-in; ... }'
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
lib_path=${1:-${NIXPKGS_LIB:-}}

fail() {
  echo "nix eval test FAILED: $1" >&2
  exit 1
}

command -v nix-instantiate >/dev/null || fail "nix-instantiate not found (apt-get install nix-bin)"
if [[ -z $lib_path ]]; then
  lib_path=$here/stand-in
elif [[ -f $lib_path/lib/default.nix ]]; then
  lib_path=$lib_path/lib
elif [[ ! -f $lib_path/default.nix ]]; then
  fail "$lib_path holds neither lib/default.nix nor default.nix"
fi
lib_path=$(cd "$lib_path" && pwd)

# Nothing here needs a store, the daemon or channels: the dummy store lets a non-root user run
# this where /nix/var belongs to root.
export NIX_PATH=
evaluate() {
  nix-instantiate --store dummy:// --eval --strict "$here/tests/eval.nix" --arg lib "import $lib_path" "$@"
}
evaluate

# The balancer's nginx configuration, as the module generates it, must pass `nginx -t`.
nginx=$(command -v nginx || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true)
command -v python3 >/dev/null || nginx=""  # unquotes the evaluated string
if [[ -z $nginx ]]; then
  echo "nginx -t of the balancer configuration SKIPPED: nginx or python3 not found" >&2
  exit 0
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for variant in nginx nginx-allowlisted; do
  {
    echo "pid $scratch/nginx.pid; error_log stderr; events {}"
    evaluate --argstr output "$variant" --json | python3 -c 'import json, sys; print(json.load(sys.stdin))'
  } >"$scratch/$variant.conf"
  "$nginx" -q -t -p "$scratch" -e stderr -c "$scratch/$variant.conf"
  echo "nginx -t: the $variant balancer configuration is valid"
done
