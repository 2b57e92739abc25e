# lib.fileset as nix/package.nix uses it, recording rather than copying: a file set is the list of
# paths it holds, and toSource gives the root and those paths relative to it (no store is needed,
# so a stub package set can hand the source to a build simulation).
{ lib }:

let
  fileset = paths: {
    _type = "fileset";
    inherit paths;
  };
  # A path, or a file set already.
  coerce =
    what: value:
    if (value._type or null) == "fileset" then
      value
    else if !builtins.isPath value then
      throw "lib.fileset.${what}: expected a path or a file set, got ${builtins.typeOf value}"
    else if !builtins.pathExists value then
      throw "lib.fileset.${what}: ${toString value} does not exist; use lib.fileset.maybeMissing for a path that may be absent"
    else
      fileset [ value ];
  relative =
    root: path:
    let
      rootText = toString root;
      pathText = toString path;
    in
    if pathText == rootText then
      "."
    else if lib.hasPrefix "${rootText}/" pathText then
      lib.removePrefix "${rootText}/" pathText
    else
      throw "lib.fileset.toSource: ${pathText} is not under the root ${rootText}";
in
{
  maybeMissing = path: fileset (lib.optional (builtins.pathExists path) path);
  unions = sets: fileset (lib.unique (builtins.concatMap (set: (coerce "unions" set).paths) sets));
  union = a: b: fileset (lib.unique ((coerce "union" a).paths ++ (coerce "union" b).paths));
  toSource =
    { root, fileset }:
    let
      paths = (coerce "toSource" fileset).paths;
      files = builtins.sort builtins.lessThan (map (relative root) paths);
    in
    builtins.deepSeq files {
      _type = "fileset-source";
      root = toString root;
      inherit files;
      outPath = toString root;
    };
}
