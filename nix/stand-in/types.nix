# Option types: what a definition may be (check), how several definitions become one value
# (merge), and the description the manual prints. Composite types parenthesise the description of
# the type they wrap unless its descriptionClass makes that unnecessary, as nixpkgs' do.
{ lib }:

let
  inherit (lib.modules) mergeDefinitions;
  inherit (lib.options)
    mergeDefaultOption
    mergeEqualOption
    mergeOneOption
    showFiles
    showOption
    ;

  mkOptionType =
    {
      name,
      description ? name,
      descriptionClass ? null,
      check ? (_: true),
      merge ? mergeDefaultOption,
      emptyValue ? { },
      getSubOptions ? (_prefix: { }),
      getSubModules ? null,
      nestedTypes ? { },
      # Another declaration's type for the same option, merged into one, or null when they clash.
      typeMerge ? null,
      deprecationMessage ? null,
    }:
    let
      type = {
        _type = "option-type";
        inherit
          name
          description
          descriptionClass
          check
          merge
          emptyValue
          getSubOptions
          getSubModules
          nestedTypes
          deprecationMessage
          ;
        typeMerge =
          if typeMerge != null then
            typeMerge
          else
            other: if other.name == name && other.description == description then type else null;
      };
    in
    type;

  # `type`'s description, in parentheses unless its class is one of `bare`.
  phrase =
    bare: type: if builtins.elem type.descriptionClass bare then type.description else "(${type.description})";

  intBetween =
    name: description: descriptionClass: lowest: highest:
    mkOptionType {
      inherit name description descriptionClass;
      check = x: builtins.isInt x && (lowest == null || x >= lowest) && (highest == null || x <= highest);
      merge = mergeEqualOption;
    };
  sizedInt =
    bits: signed:
    let
      power = builtins.foldl' (acc: _: acc * 2) 1 (lib.range 1 bits);
      lowest = if signed then -(power / 2) else 0;
      highest = if signed then power / 2 - 1 else power - 1;
    in
    intBetween "${if signed then "signed" else "unsigned"}Int${toString bits}"
      "${toString bits} bit ${if signed then "signed" else "unsigned"} integer; between ${toString lowest} and ${toString highest} (both inclusive)"
      "noun"
      lowest
      highest;

  showEnumValue =
    value:
    if builtins.isString value then
      builtins.toJSON value
    else if builtins.isBool value then
      lib.boolToString value
    else
      toString value;

  separatedString =
    separator:
    mkOptionType {
      name = "separatedString";
      description = "strings concatenated with ${builtins.toJSON separator}";
      descriptionClass = "noun";
      check = builtins.isString;
      merge = _loc: defs: builtins.concatStringsSep separator (map (def: def.value) defs);
    };

  # The entries of list definitions, each merged on its own (mkIf, coercions, submodules).
  listMerge =
    elemType: loc: defs:
    map (entry: entry.value) (
      builtins.filter (entry: entry ? value) (
        builtins.concatLists (
          lib.imap1 (
            n: def:
            lib.imap1 (
              m: value:
              (mergeDefinitions (loc ++ [ "[definition ${toString n}-entry ${toString m}]" ]) elemType [
                {
                  inherit (def) file;
                  inherit value;
                }
              ]).optionalValue
            ) def.value
          ) defs
        )
      )
    );

  # Per attribute: the merged value, or {} where every definition was discarded (mkIf false).
  attrsMerge =
    elemType: loc: defs:
    lib.zipAttrsWith (name: defs: (mergeDefinitions (loc ++ [ name ]) elemType defs).optionalValue) (
      map (def: builtins.mapAttrs (_: value: { inherit (def) file; inherit value; }) def.value) defs
    );

  submoduleWith =
    {
      modules,
      specialArgs ? { },
      shorthandOnlyDefinesConfig ? false,
      description ? null,
    }:
    let
      asModules = map (
        def:
        if shorthandOnlyDefinesConfig && builtins.isAttrs def.value then
          {
            _file = def.file;
            config = def.value;
          }
        else
          {
            _file = def.file;
            imports = [ def.value ];
          }
      );
      evaluate =
        loc: extraModules:
        lib.evalModules {
          inherit specialArgs;
          prefix = loc;
          modules = modules ++ [ { _module.args.name = lib.mkOptionDefault (lib.last loc); } ] ++ extraModules;
        };
      submoduleType = mkOptionType {
        name = "submodule";
        description = if description != null then description else "submodule";
        check = x: builtins.isAttrs x || builtins.isFunction x || builtins.isPath x;
        merge = loc: defs: (evaluate loc (asModules defs)).config;
        getSubOptions = prefix: (evaluate prefix [ ]).options;
        getSubModules = modules;
        typeMerge =
          other:
          if other.name == "submodule" then
            submoduleWith {
              modules = modules ++ other.getSubModules;
              inherit specialArgs shorthandOnlyDefinesConfig description;
            }
          else
            null;
      };
    in
    submoduleType;

  types = rec {
    inherit mkOptionType submoduleWith separatedString;

    raw = mkOptionType {
      name = "raw";
      description = "raw value";
      descriptionClass = "noun";
      merge = mergeOneOption;
    };
    unspecified = mkOptionType {
      name = "unspecified";
      description = "unspecified value";
      descriptionClass = "noun";
    };
    anything = mkOptionType {
      name = "anything";
      descriptionClass = "noun";
      merge =
        loc: defs:
        let
          kind =
            value:
            if builtins.isAttrs value && lib.isStringLike value then "stringCoercibleSet" else builtins.typeOf value;
          common = kind (builtins.head defs).value;
        in
        if !builtins.all (def: kind def.value == common) defs then
          throw "The option `${showOption loc}' has conflicting option types in ${showFiles (map (def: def.file) defs)}"
        else if common == "set" then
          (attrsOf anything).merge loc defs
        else if common == "list" && builtins.length defs == 1 then
          (listOf anything).merge loc defs
        else if common == "lambda" then
          x: anything.merge loc (map (def: def // { value = def.value x; }) defs)
        else if common == "stringCoercibleSet" then
          mergeOneOption loc defs
        else
          mergeEqualOption loc defs;
    };

    bool = mkOptionType {
      name = "bool";
      description = "boolean";
      descriptionClass = "noun";
      check = builtins.isBool;
      merge = mergeEqualOption;
    };
    int = intBetween "int" "signed integer" "noun" null null;
    ints = {
      between =
        lowest: highest:
        intBetween "intBetween" "integer between ${toString lowest} and ${toString highest} (both inclusive)" "noun"
          lowest
          highest;
      unsigned = intBetween "unsignedInt" "unsigned integer, meaning >=0" "nonRestrictiveClause" 0 null;
      positive = intBetween "positiveInt" "positive integer, meaning >0" "nonRestrictiveClause" 1 null;
      u8 = sizedInt 8 false;
      u16 = sizedInt 16 false;
      u32 = sizedInt 32 false;
      s8 = sizedInt 8 true;
      s16 = sizedInt 16 true;
      s32 = sizedInt 32 true;
    };
    port = ints.u16;
    float = mkOptionType {
      name = "float";
      description = "floating point number";
      descriptionClass = "noun";
      check = builtins.isFloat;
      merge = mergeEqualOption;
    };

    str = mkOptionType {
      name = "str";
      description = "string";
      descriptionClass = "noun";
      check = builtins.isString;
      merge = mergeEqualOption;
    };
    nonEmptyStr = mkOptionType {
      name = "nonEmptyStr";
      description = "non-empty string";
      descriptionClass = "noun";
      check = x: builtins.isString x && builtins.match "[ \t\n]*" x == null;
      merge = mergeEqualOption;
    };
    singleLineStr = mkOptionType {
      name = "singleLineStr";
      description = "(optionally newline-terminated) single-line string";
      descriptionClass = "noun";
      check = x: builtins.isString x && builtins.match "[^\n]*\n?" x != null;
      merge = loc: defs: lib.removeSuffix "\n" (mergeEqualOption loc defs);
    };
    lines = separatedString "\n";
    commas = separatedString ",";
    strMatching =
      pattern:
      mkOptionType {
        name = "strMatching ${builtins.toJSON pattern}";
        description = "string matching the pattern ${pattern}";
        descriptionClass = "noun";
        check = x: builtins.isString x && builtins.match pattern x != null;
        merge = mergeEqualOption;
      };
    enum =
      values:
      mkOptionType {
        name = "enum";
        description =
          if values == [ ] then
            "impossible (empty enum)"
          else if builtins.length values == 1 then
            "value ${showEnumValue (builtins.head values)} (singular enum)"
          else
            "one of ${builtins.concatStringsSep ", " (map showEnumValue values)}";
        descriptionClass = if builtins.length values < 2 then "noun" else "conjunction";
        check = x: builtins.elem x values;
        merge = mergeEqualOption;
      };

    path = mkOptionType {
      name = "path";
      description = "absolute path";
      descriptionClass = "noun";
      check = x: lib.isStringLike x && builtins.substring 0 1 (toString x) == "/";
      merge = mergeEqualOption;
    };
    package = mkOptionType {
      name = "package";
      descriptionClass = "noun";
      check = x: lib.isDerivation x || (builtins.isString x && lib.hasPrefix builtins.storeDir x);
      merge = mergeOneOption;
    };
    attrs = mkOptionType {
      name = "attrs";
      description = "attribute set";
      check = builtins.isAttrs;
      merge = _loc: defs: builtins.foldl' (a: def: a // def.value) { } defs;
    };

    listOf =
      elemType:
      mkOptionType {
        name = "listOf";
        description = "list of ${phrase [ "noun" "composite" ] elemType}";
        descriptionClass = "composite";
        check = builtins.isList;
        merge = listMerge elemType;
        emptyValue.value = [ ];
        getSubOptions = prefix: elemType.getSubOptions (prefix ++ [ "*" ]);
        getSubModules = elemType.getSubModules;
        nestedTypes.elemType = elemType;
      };
    nonEmptyListOf =
      elemType:
      let
        list = listOf elemType;
      in
      list
      // {
        description = "non-empty ${phrase [ "noun" ] list}";
        check = x: list.check x && x != [ ];
      };
    attrsOf =
      elemType:
      mkOptionType {
        name = "attrsOf";
        description = "attribute set of ${phrase [ "noun" "composite" ] elemType}";
        descriptionClass = "composite";
        check = builtins.isAttrs;
        merge =
          loc: defs:
          builtins.mapAttrs (_: merged: merged.value) (lib.filterAttrs (_: merged: merged ? value) (attrsMerge elemType loc defs));
        emptyValue.value = { };
        getSubOptions = prefix: elemType.getSubOptions (prefix ++ [ "<name>" ]);
        getSubModules = elemType.getSubModules;
        nestedTypes.elemType = elemType;
      };
    lazyAttrsOf =
      elemType:
      mkOptionType {
        name = "lazyAttrsOf";
        description = "lazy attribute set of ${phrase [ "noun" "composite" ] elemType}";
        descriptionClass = "composite";
        check = builtins.isAttrs;
        merge =
          loc: defs:
          builtins.mapAttrs (
            name: merged: merged.value or (throw "The option `${showOption (loc ++ [ name ])}' is used but not defined.")
          ) (attrsMerge elemType loc defs);
        emptyValue.value = { };
        getSubOptions = prefix: elemType.getSubOptions (prefix ++ [ "<name>" ]);
        getSubModules = elemType.getSubModules;
        nestedTypes.elemType = elemType;
      };
    uniq = elemType: elemType // { merge = mergeOneOption; };
    unique = { message }: elemType: elemType // { merge = mergeOneOption; };

    nullOr =
      elemType:
      mkOptionType {
        name = "nullOr";
        description = "null or ${phrase [ "noun" "conjunction" ] elemType}";
        descriptionClass = "conjunction";
        check = x: x == null || elemType.check x;
        merge =
          loc: defs:
          let
            nulls = lib.count (def: def.value == null) defs;
          in
          if nulls == builtins.length defs then
            null
          else if nulls != 0 then
            throw "The option `${showOption loc}' is defined both null and not null, in ${showFiles (map (def: def.file) defs)}."
          else
            elemType.merge loc defs;
        emptyValue.value = null;
        getSubOptions = elemType.getSubOptions;
        getSubModules = elemType.getSubModules;
        nestedTypes.elemType = elemType;
      };
    either =
      left: right:
      mkOptionType {
        name = "either";
        description =
          (
            if left.descriptionClass == "nonRestrictiveClause" then
              "${left.description},"
            else
              phrase [ "noun" "conjunction" ] left
          )
          + " or ${phrase [ "noun" "conjunction" "composite" ] right}";
        descriptionClass = "conjunction";
        check = x: left.check x || right.check x;
        merge =
          loc: defs:
          if builtins.all (def: left.check def.value) defs then
            left.merge loc defs
          else if builtins.all (def: right.check def.value) defs then
            right.merge loc defs
          else
            mergeOneOption loc defs;
        nestedTypes = { inherit left right; };
      };
    oneOf =
      alternatives:
      if alternatives == [ ] then
        throw "types.oneOf needs at least one type"
      else
        lib.foldr either (lib.last alternatives) (lib.init alternatives);
    coercedTo =
      fromType: coerce: toType:
      mkOptionType {
        name = "coercedTo";
        description = "${phrase [ "noun" ] toType} or ${phrase [ "noun" ] fromType} convertible to it";
        check = x: (fromType.check x && toType.check (coerce x)) || toType.check x;
        merge =
          loc: defs:
          toType.merge loc (map (def: def // { value = if fromType.check def.value then coerce def.value else def.value; }) defs);
        emptyValue = toType.emptyValue;
        getSubOptions = toType.getSubOptions;
        getSubModules = toType.getSubModules;
        nestedTypes = { inherit fromType toType; };
      };

    submodule =
      modules:
      submoduleWith {
        shorthandOnlyDefinesConfig = true;
        modules = lib.toList modules;
      };
  };
in
types
