# The module system: evalModules, the definition properties (mkIf, mkMerge, priorities, order) and
# how definitions meet declarations. Written from the nixpkgs manual's description of modules:
# modules are attribute sets, functions of the module arguments, or files holding either; each
# declares options and defines config; definitions of an option are filtered by priority (the
# lowest number wins, mkOptionDefault 1500 < mkDefault 1000 < plain 100 < mkForce 50), ordered by
# mkOrder, checked against the option's type and merged by it.
{ lib }:

let
  inherit (lib.options)
    isOption
    mkOption
    showDefs
    showFiles
    showOption
    ;

  defaultOverridePriority = 100;
  defaultOrderPriority = 1000;
  kind = value: if builtins.isAttrs value then value._type or "" else "";

  # mkMerge and mkIf around a definition, resolved: the list of definitions that apply.
  dischargeProperties =
    value:
    if kind value == "merge" then
      builtins.concatMap dischargeProperties value.contents
    else if kind value == "if" then
      if !builtins.isBool value.condition then
        throw "mkIf called with a non-Boolean condition"
      else if value.condition then
        dischargeProperties value.content
      else
        [ ]
    else
      [ value ];

  # A definition of a set of options, as attribute sets whose values carry the properties that
  # surrounded the set. Conditions are not evaluated, so a module may test its own config.
  pushDownProperties =
    value:
    if kind value == "merge" then
      builtins.concatMap pushDownProperties value.contents
    else if kind value == "if" then
      map (builtins.mapAttrs (_: mkIf value.condition)) (pushDownProperties value.content)
    else if kind value == "override" then
      map (builtins.mapAttrs (_: mkOverride value.priority)) (pushDownProperties value.content)
    else
      [ value ];

  priorityOf = def: if kind def.value == "override" then def.value.priority else defaultOverridePriority;
  filterOverrides =
    defs:
    let
      highestPrio = builtins.foldl' (acc: def: if priorityOf def < acc then priorityOf def else acc) 9999 defs;
    in
    {
      inherit highestPrio;
      values = map (def: if kind def.value == "override" then def // { value = def.value.content; } else def) (
        builtins.filter (def: priorityOf def == highestPrio) defs
      );
    };
  orderOf = def: if kind def.value == "order" then def.value.priority else defaultOrderPriority;
  # Stable: equal priorities keep their order.
  sortProperties =
    defs:
    if !builtins.any (def: kind def.value == "order") defs then
      defs
    else
      map
        (entry: if kind entry.def.value == "order" then entry.def // { value = entry.def.value.content; } else entry.def)
        (
          builtins.sort (a: b: a.order < b.order || (a.order == b.order && a.index < b.index)) (
            lib.imap0 (index: def: {
              inherit index def;
              order = orderOf def;
            }) defs
          )
        );

  mergeDefinitions =
    loc: type: defs:
    let
      discharged = builtins.concatMap (
        def:
        map (value: {
          inherit (def) file;
          inherit value;
        }) (dischargeProperties def.value)
      ) defs;
      overridden = filterOverrides discharged;
      defsFinal = sortProperties overridden.values;
      isDefined = defsFinal != [ ];
      badDefs = builtins.filter (def: !type.check def.value) defsFinal;
      mergedValue =
        if !isDefined then
          throw "The option `${showOption loc}' is used but not defined."
        else if badDefs != [ ] then
          throw "A definition for option `${showOption loc}' is not of type `${type.description}'. Definition values:${showDefs badDefs}"
        else
          type.merge loc defsFinal;
    in
    {
      inherit defsFinal isDefined mergedValue;
      inherit (overridden) highestPrio;
      optionalValue = if isDefined then { value = mergedValue; } else { };
    };

  # Several declarations of one option (submodule types merge, as do identical types).
  mergeOptionDecls =
    loc: decls:
    builtins.foldl' (
      acc: decl:
      let
        opt = decl.options;
        type =
          if !(acc ? type) then
            opt.type or null
          else if !(opt ? type) then
            acc.type
          else
            let
              merged = acc.type.typeMerge opt.type;
            in
            if merged == null then
              throw "The option `${showOption loc}' in `${decl.file}' is already declared in ${showFiles acc.declarations}."
            else
              merged;
      in
      if acc ? default && opt ? default then
        throw "The option `${showOption loc}' in `${decl.file}' has a default already given in ${showFiles acc.declarations}."
      else
        acc
        // removeAttrs opt [ "type" ]
        // lib.optionalAttrs (type != null) { inherit type; }
        // {
          declarations = acc.declarations ++ [ decl.file ];
        }
    ) { declarations = [ ]; } decls;

  evalOptionValue =
    loc: decls: defs:
    let
      declared = mergeOptionDecls loc decls;
      opt = declared // {
        type = declared.type or lib.types.unspecified;
      };
      defaultDefs = lib.optional (opt ? default) {
        file = builtins.head opt.declarations;
        value = mkOptionDefault opt.default;
      };
      merged = mergeDefinitions loc opt.type (defaultDefs ++ defs);
      value =
        if (opt.readOnly or false) && builtins.length merged.defsFinal > 1 then
          throw "The option `${showOption loc}' is read-only, but it's set multiple times, in ${showFiles (map (def: def.file) merged.defsFinal)}."
        else if opt ? apply then
          opt.apply merged.mergedValue
        else
          merged.mergedValue;
    in
    opt
    // {
      _type = "option";
      inherit loc value;
      inherit (merged) isDefined highestPrio;
      files = map (def: def.file) merged.defsFinal;
      definitions = map (def: def.value) merged.defsFinal;
      definitionsWithLocations = merged.defsFinal;
    };

  # The options under `loc` (declarations: { file, options } where options is the subtree there)
  # with their definitions ({ file, value }): the tree of evaluated options, and the definitions
  # that no declaration matched ({ file, path, value }, path below loc).
  mergeTree =
    loc: decls: defs:
    let
      optionDecls = builtins.filter (decl: isOption decl.options) decls;
      setDecls = builtins.filter (decl: !isOption decl.options) decls;
      pushed = builtins.concatMap (
        def:
        map (
          value:
          if builtins.isAttrs value then
            {
              inherit (def) file;
              inherit value;
            }
          else
            throw "A definition for `${showOption loc}' is not an attribute set of options (in ${showFiles [ def.file ]}):${showDefs [ def ]}"
        ) (pushDownProperties def.value)
      ) defs;
      names = lib.unique (builtins.concatMap (decl: builtins.attrNames decl.options) decls);
      children = lib.genAttrs names (
        name:
        mergeTree (loc ++ [ name ])
          (builtins.concatMap (
            decl:
            lib.optional (decl.options ? ${name}) {
              inherit (decl) file;
              options = decl.options.${name};
            }
          ) decls)
          (builtins.concatMap (
            def:
            lib.optional (def.value ? ${name}) {
              inherit (def) file;
              value = def.value.${name};
            }
          ) pushed)
      );
      stray = builtins.concatMap (
        def:
        map (name: {
          inherit (def) file;
          path = [ name ];
          value = def.value.${name};
        }) (builtins.filter (name: !builtins.elem name names) (builtins.attrNames def.value))
      ) pushed;
    in
    if optionDecls != [ ] && setDecls != [ ] then
      throw "The option `${showOption loc}' in ${showFiles (map (d: d.file) optionDecls)} is a prefix of options declared in ${showFiles (map (d: d.file) setDecls)}."
    else if optionDecls != [ ] then
      {
        options = evalOptionValue loc decls defs;
        unmatched = [ ];
      }
    else
      {
        options = builtins.mapAttrs (_: child: child.options) children;
        unmatched =
          stray
          ++ builtins.concatMap (
            name: map (def: def // { path = [ name ] ++ def.path; }) children.${name}.unmatched
          ) names;
      };

  valuesOf = options: if isOption options then options.value else builtins.mapAttrs (_: valuesOf) options;

  # What every evaluation has: the module arguments, the unknown-option check, a freeform type.
  internalModule = {
    _file = "lib.evalModules (stand-in)";
    key = "lib.evalModules (stand-in)";
    options._module = {
      args = mkOption {
        type = lib.types.lazyAttrsOf lib.types.raw;
        internal = true;
        description = "Arguments passed to each module.";
      };
      check = mkOption {
        type = lib.types.bool;
        default = true;
        internal = true;
        description = "Whether to check that every definition has a declared option.";
      };
      freeformType = mkOption {
        type = lib.types.nullOr lib.types.raw;
        default = null;
        internal = true;
        description = "The type of definitions no option declares.";
      };
    };
    config._module.args = { };
  };

  structuredAttributes = [
    "_class"
    "_file"
    "key"
    "disabledModules"
    "imports"
    "options"
    "config"
    "meta"
    "freeformType"
  ];

  # A module as { file, key, imports, disabledModules, options, config }.
  unifyModule =
    file: key: m:
    let
      file' = toString (m._file or file);
      structured = m ? config || m ? options;
      unsupported = builtins.attrNames (removeAttrs m structuredAttributes);
      extras =
        lib.optional (m ? meta) { meta = m.meta; }
        ++ lib.optional (m ? freeformType) { _module.freeformType = m.freeformType; };
      config =
        if structured then
          m.config or { }
        else
          removeAttrs m [
            "_class"
            "_file"
            "key"
            "disabledModules"
            "imports"
            "freeformType"
          ];
    in
    if !builtins.isAttrs m then
      throw "The module in ${showFiles [ file ]} is neither an attribute set nor a function returning one."
    else if structured && unsupported != [ ] then
      throw "Module `${file'}' has an unsupported attribute `${builtins.head unsupported}': with a top-level `config' or `options', move every definition (${builtins.concatStringsSep ", " unsupported}) into `config'."
    else
      {
        file = file';
        key = toString (m.key or key);
        imports = m.imports or [ ];
        disabledModules = m.disabledModules or [ ];
        options = m.options or { };
        config = if extras == [ ] then config else mkMerge ([ config ] ++ extras);
      };

  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };
  mkMerge = contents: {
    _type = "merge";
    inherit contents;
  };
  mkOverride = priority: content: {
    _type = "override";
    inherit priority content;
  };
  mkOptionDefault = mkOverride 1500;
  mkOrder = priority: content: {
    _type = "order";
    inherit priority content;
  };

  evalModules =
    {
      modules,
      specialArgs ? { },
      prefix ? [ ],
      ...
    }@evalArgs:
    let
      # What a module function is called with; _module.args supply the names it asks for beyond these.
      baseArgs = {
        inherit lib config options specialArgs;
        _prefix = prefix;
      } // specialArgs;
      applyArgs =
        f:
        f (
          baseArgs
          // builtins.mapAttrs (name: _: declaredConfig._module.args.${name}) (
            builtins.removeAttrs (builtins.functionArgs f) (builtins.attrNames baseArgs)
          )
        );
      load =
        file: key: m:
        if builtins.isPath m || builtins.isString m then
          load (toString m) (toString m) (import m)
        else if builtins.isFunction m then
          unifyModule file key (applyArgs m)
        else
          unifyModule file key m;
      importsOf =
        module:
        lib.imap1 (n: imported: load module.file "${module.key}:anon-${toString n}" imported) module.imports;
      topLevel = [ (load "lib.evalModules (stand-in)" "lib.evalModules (stand-in)" internalModule) ]
        ++ lib.imap1 (n: load "<unknown-file>" "anon-${toString n}") modules;
      closure =
        disabled:
        builtins.genericClosure {
          startSet = builtins.filter (module: !builtins.elem module.key disabled) topLevel;
          operator = module: builtins.filter (imported: !builtins.elem imported.key disabled) (importsOf module);
        };
      # disabledModules names a module by its file, its `key`, or a file under specialArgs.modulesPath.
      disabledKey =
        entry:
        if builtins.isAttrs entry then
          toString entry.key
        else if builtins.isString entry && !lib.hasPrefix "/" entry && specialArgs ? modulesPath then
          "${toString specialArgs.modulesPath}/${entry}"
        else
          toString entry;
      disabledKeys = map disabledKey (builtins.concatMap (module: module.disabledModules) (closure [ ]));
      # Definitions are listed in the order nixpkgs gives them: the last module reached first.
      collected = lib.reverseList (if disabledKeys == [ ] then closure [ ] else closure disabledKeys);

      tree = mergeTree prefix (map (module: { inherit (module) file options; }) collected) (
        map (module: {
          inherit (module) file;
          value = module.config;
        }) collected
      );
      options = tree.options;
      declaredConfig = valuesOf options;
      freeformType = declaredConfig._module.freeformType;
      config =
        if freeformType == null then
          declaredConfig
        else
          lib.recursiveUpdate (freeformType.merge prefix (
            map (def: {
              inherit (def) file;
              value = lib.setAttrByPath def.path def.value;
            }) tree.unmatched
          )) declaredConfig;
      unmatchedCheck =
        if declaredConfig._module.check && freeformType == null && tree.unmatched != [ ] then
          let
            def = builtins.head tree.unmatched;
          in
          throw "The option `${showOption (prefix ++ def.path)}' does not exist. Definition values:${showDefs [ def ]}"
        else
          null;
      checked = builtins.seq unmatchedCheck;
    in
    {
      options = checked options;
      config = checked (removeAttrs config [ "_module" ]);
      _module = checked config._module;
      type = lib.types.submoduleWith { inherit modules specialArgs; };
      extendModules =
        {
          modules ? [ ],
          specialArgs ? { },
          prefix ? evalArgs.prefix or [ ],
        }:
        evalModules (
          evalArgs
          // {
            modules = evalArgs.modules ++ modules;
            specialArgs = evalArgs.specialArgs or { } // specialArgs;
            inherit prefix;
          }
        );
    };
in
{
  inherit
    evalModules
    mergeDefinitions
    mkIf
    mkMerge
    mkOptionDefault
    mkOrder
    mkOverride
    ;
  mkDefault = mkOverride 1000;
  mkForce = mkOverride 50;
  mkBefore = mkOrder 500;
  mkAfter = mkOrder 1500;
}
