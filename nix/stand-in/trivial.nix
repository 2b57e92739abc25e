# Functions, type predicates, package accessors and meta data (licences, platforms) of the
# stand-in library.
{ lib }:

rec {
  inherit (builtins)
    isAttrs
    isBool
    isFloat
    isFunction
    isInt
    isList
    isPath
    isString
    typeOf
    ;
  id = x: x;
  # The formal arguments of a function, or of a functor (an attribute set with __functor), which
  # may state them in __functionArgs.
  functionArgs =
    f:
    if f ? __functor then f.__functionArgs or (functionArgs (f.__functor f)) else builtins.functionArgs f;
  warn = message: builtins.trace "evaluation warning: ${message}";
  assertMsg = condition: message: condition || throw message;

  importTOML = path: builtins.fromTOML (builtins.readFile path);

  # `pname` when the package has one, else the name without its version.
  getName =
    x:
    if builtins.isString x then (builtins.parseDrvName x).name else x.pname or (builtins.parseDrvName x.name).name;
  getOutput = output: pkg: pkg.${output} or pkg.out or pkg;
  getBin = getOutput "bin";
  getLib = getOutput "lib";
  getExe' =
    pkg: program:
    assert lib.assertMsg (lib.isDerivation pkg) "getExe': the first argument is not a derivation";
    assert lib.assertMsg (builtins.isString program && !lib.hasInfix "/" program)
      "getExe': the program name must be a file name";
    "${getBin pkg}/bin/${program}";
  getExe =
    pkg:
    getExe' pkg (
      pkg.meta.mainProgram or (warn "getExe: ${getName pkg} has no meta.mainProgram, guessing ${getName pkg}" (getName pkg))
    );

  # Only what nix/ names; each licence carries the fields meta checks read.
  licenses = {
    agpl3Plus = {
      shortName = "agpl3Plus";
      spdxId = "AGPL-3.0-or-later";
      fullName = "GNU Affero General Public License v3.0 or later";
      free = true;
      redistributable = true;
      deprecated = false;
    };
  };
  platforms = {
    linux = [
      "aarch64-linux"
      "armv7l-linux"
      "i686-linux"
      "powerpc64le-linux"
      "riscv64-linux"
      "x86_64-linux"
    ];
  };
  maintainers = { };
}
