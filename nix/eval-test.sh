#!/usr/bin/env bash
# Evaluate nix/module.nix against the nixpkgs library with lib.evalModules (nix/tests/eval.nix).
#
# Usage: nix/eval-test.sh [PATH]
#   PATH, or $NIXPKGS_LIB: a checkout of nixpkgs or of nix-community/nixpkgs.lib (the folder that
#   holds lib/), or the lib/ folder itself. Needs only nix-instantiate (Debian: nix-bin), no network.
# Without a library the test is skipped (exit 0) with a message saying so; set
# IMMICH_ML_REQUIRE_NIX_EVAL=1 to make that an error instead.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
lib_path=${1:-${NIXPKGS_LIB:-}}

skip() {
  echo "nix eval test SKIPPED: $1" >&2
  echo "  get the library with: git clone https://github.com/nix-community/nixpkgs.lib /some/dir" >&2
  echo "  then run: $0 /some/dir" >&2
  if [[ ${IMMICH_ML_REQUIRE_NIX_EVAL:-} == 1 ]]; then exit 1; fi
  exit 0
}

command -v nix-instantiate >/dev/null || skip "nix-instantiate not found (apt-get install nix-bin)"
[[ -n $lib_path ]] || skip "no nixpkgs library given (argument or NIXPKGS_LIB)"
if [[ -f $lib_path/lib/default.nix ]]; then
  lib_path=$lib_path/lib
elif [[ ! -f $lib_path/default.nix ]]; then
  skip "$lib_path holds neither lib/default.nix nor default.nix"
fi
lib_path=$(cd "$lib_path" && pwd)

# Nothing here needs a store, the daemon or channels: the dummy store lets a non-root user run
# this where /nix/var belongs to root.
export NIX_PATH=
nix-instantiate --store dummy:// --eval --strict "$here/tests/eval.nix" \
  --arg lib "import $lib_path"
