# Option declarations (mkOption and its shorthands) and the merge functions option types share.
{ lib }:

let
  identifier = name: builtins.match "[A-Za-z_][A-Za-z0-9_'-]*" name != null;
  placeholder = name: builtins.elem name [
    "*"
    "<name>"
  ] || lib.hasPrefix "[definition " name;
in
rec {
  mkOption = attrs: attrs // { _type = "option"; };
  isOption = x: builtins.isAttrs x && (x._type or "") == "option";

  mkEnableOption =
    name:
    mkOption {
      type = lib.types.bool;
      default = false;
      example = true;
      description = "Whether to enable ${name}.";
    };

  # The option for `pkgs.<name>` (or the attribute path `default`), described the way nixpkgs does;
  # a string `example` is an expression, a list an attribute path in `pkgs`.
  mkPackageOption =
    pkgs: name:
    {
      default ? null,
      example ? null,
      extraDescription ? "",
      nullable ? false,
      pkgsText ? "pkgs",
    }:
    let
      namePath = lib.toList name;
      defaultPath = if default == null then namePath else lib.toList default;
      pathText = path: builtins.concatStringsSep "." ([ pkgsText ] ++ path);
      shownName = lib.last namePath;
    in
    mkOption (
      {
        type = if nullable then lib.types.nullOr lib.types.package else lib.types.package;
        default = lib.getAttrFromPath defaultPath pkgs;
        defaultText = literalExpression (pathText defaultPath);
        description = "The ${shownName} package to use." + lib.optionalString (extraDescription != "") " ${extraDescription}";
      }
      // lib.optionalAttrs (example != null) {
        example = literalExpression (if builtins.isString example then example else pathText example);
      }
    );

  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };

  getValues = map (def: def.value);
  getFiles = map (def: def.file);

  # An option path as the manual writes it: a.b."not.an.identifier".
  showOption =
    loc:
    builtins.concatStringsSep "." (
      map (name: if identifier name || placeholder name then name else builtins.toJSON name) loc
    );
  showFiles = files: builtins.concatStringsSep " and " (map (file: "`${toString file}'") files);

  # A definition's value, short enough for an error message.
  showValue =
    value:
    if builtins.isString value then
      builtins.toJSON value
    else if builtins.isBool value then
      lib.boolToString value
    else if value == null then
      "null"
    else if builtins.isList value then
      "[ ${builtins.concatStringsSep " " (map showValue value)} ]"
    else if lib.isDerivation value then
      "«derivation ${value.name or "?"}»"
    else if builtins.isAttrs value then
      "{ ${builtins.concatStringsSep " " (map (name: "${name} = ${showValue value.${name}};") (builtins.attrNames value))} }"
    else if builtins.isFunction value then
      "«function»"
    else
      toString value;
  showDefs = defs: lib.concatMapStrings (def: "\n- In ${showFiles [ def.file ]}: ${showValue def.value}") defs;

  # Every definition must give the same value.
  mergeEqualOption =
    loc: defs:
    let
      first = builtins.head defs;
    in
    if defs == [ ] then
      throw "mergeEqualOption: no definitions for `${showOption loc}'"
    else if builtins.all (def: def.value == first.value) (builtins.tail defs) then
      first.value
    else
      throw "The option `${showOption loc}' has conflicting definition values:${showDefs defs}\nUse `lib.mkForce value` or `lib.mkDefault value` to change the priority on any of these definitions.";

  # Exactly one definition.
  mergeOneOption =
    loc: defs:
    if builtins.length defs == 1 then
      (builtins.head defs).value
    else
      throw "The option `${showOption loc}' is defined multiple times while it's expected to be unique.\nDefinition values:${showDefs defs}\nUse `lib.mkForce value` or `lib.mkDefault value` to change the priority on any of these definitions.";

  # `types.unspecified`: lists concatenate, sets update, booleans or, strings concatenate.
  mergeDefaultOption =
    loc: defs:
    let
      values = getValues defs;
      every = pred: builtins.all pred values;
    in
    if builtins.length values == 1 then
      builtins.head values
    else if every builtins.isFunction then
      x: mergeDefaultOption loc (map (def: def // { value = def.value x; }) defs)
    else if every builtins.isList then
      builtins.concatLists values
    else if every builtins.isAttrs then
      builtins.foldl' (a: b: a // b) { } values
    else if every builtins.isBool then
      builtins.any (x: x) values
    else if every builtins.isString then
      lib.concatStrings values
    else if every builtins.isInt && every (x: x == builtins.head values) then
      builtins.head values
    else
      throw "Cannot merge definitions of `${showOption loc}'. Definition values:${showDefs defs}";
}
