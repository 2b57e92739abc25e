# Attribute-set helpers of the stand-in library.
{ lib }:

rec {
  inherit (builtins)
    attrNames
    attrValues
    listToAttrs
    mapAttrs
    removeAttrs
    ;
  filterAttrs = pred: set: builtins.removeAttrs set (builtins.filter (name: !pred name set.${name}) (builtins.attrNames set));
  nameValuePair = name: value: { inherit name value; };
  mapAttrsToList = f: set: map (name: f name set.${name}) (builtins.attrNames set);
  mapAttrs' = f: set: builtins.listToAttrs (mapAttrsToList f set);
  genAttrs = names: f: builtins.listToAttrs (map (name: nameValuePair name (f name)) names);
  optionalAttrs = condition: set: if condition then set else { };
  attrByPath =
    path: default: set:
    if path == [ ] then
      set
    else if builtins.isAttrs set && set ? ${builtins.head path} then
      attrByPath (builtins.tail path) default set.${builtins.head path}
    else
      default;
  hasAttrByPath =
    path: set:
    path == [ ]
    || (builtins.isAttrs set && set ? ${builtins.head path} && hasAttrByPath (builtins.tail path) set.${builtins.head path});
  getAttrFromPath =
    path: set:
    attrByPath path (throw "cannot find attribute `${builtins.concatStringsSep "." path}'") set;
  setAttrByPath =
    path: value:
    if path == [ ] then value else { ${builtins.head path} = setAttrByPath (builtins.tail path) value; };
  zipAttrsWith =
    f: sets:
    let
      names = lib.unique (builtins.concatMap builtins.attrNames sets);
    in
    genAttrs names (name: f name (builtins.catAttrs name sets));
  recursiveUpdate =
    lhs: rhs:
    lhs
    // builtins.mapAttrs (
      name: value:
      if builtins.isAttrs value && builtins.isAttrs (lhs.${name} or null) && !isDerivation value then
        recursiveUpdate lhs.${name} value
      else
        value
    ) rhs;
  isDerivation = x: builtins.isAttrs x && (x.type or null) == "derivation";
}
