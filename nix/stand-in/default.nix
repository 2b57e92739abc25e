# A stand-in for nixpkgs' `lib`: exactly what nix/ and flake.nix use, written for this project
# from the behaviour the nixpkgs manual documents (no code copied), so that CI, which cannot fetch
# nixpkgs, evaluates the module and the package on every run:
#
#   nix-instantiate --eval --strict nix/tests/eval.nix --arg lib 'import ./nix/stand-in'
#
# nix/eval-test.sh checks it against the real library whenever one is given, and
# tests/nix/test_stand_in.py fails when nix/ uses a `lib` function that is missing here. To add one:
# write it in the file of its concern below from the manual's description (never nixpkgs' code), add
# a case to nix/tests/stand-in.nix, and run `nix/eval-test.sh /path/to/nixpkgs.lib`, which compares
# both libraries and refreshes nix/stand-in/checked-against-real-lib.
let
  part = file: import file { inherit lib; };
  strings = part ./strings.nix;
  lists = part ./lists.nix;
  attrsets = part ./attrsets.nix;
  trivial = part ./trivial.nix;
  options = part ./options.nix;
  modules = part ./modules.nix;
  renames = part ./renames.nix;
  lib =
    strings
    // lists
    // attrsets
    // trivial
    // options
    // modules
    // renames
    // {
      inherit
        strings
        lists
        attrsets
        trivial
        options
        modules
        ;
      types = part ./types.nix;
      fileset = part ./fileset.nix;
    };
in
lib
