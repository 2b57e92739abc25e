# The module system's and the helpers' behaviour, beyond what nix/module.nix uses today, as plain
# data: nix/eval-test.sh evaluates this with nixpkgs' lib and with our stand-in (nix/stand-in) and
# requires identical results, so the stand-in stays right as the module grows. A value that fails to
# evaluate (a type error, a conflict, an unknown option) shows as "<error>".
#
#   nix-instantiate --store dummy:// --eval --strict --json nix/tests/stand-in.nix --arg lib 'import ./nix/stand-in'
{ lib }:

let
  inherit (lib) mkOption types;

  plain = import ./plain.nix lib;
  option = type: default: mkOption { inherit type default; };
  evalConfig = modules: (lib.evalModules { inherit modules; }).config;
  # One option `o` of `type`, defined by each of `definitions` in its own module.
  merged =
    type: definitions:
    (evalConfig ([ { options.o = mkOption { inherit type; }; } ] ++ map (value: { o = value; }) definitions)).o;

  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    meta.mainProgram = "hello";
  };

  # Units as NixOS declares them, for definitions spread over modules.
  unitsModule = {
    options.systemd = {
      services = option (types.attrsOf (
        types.submodule (
          { name, config, ... }:
          {
            options = {
              description = option types.str "unit ${name}";
              after = option (types.listOf types.str) [ ];
              environment = option (types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ]))) { };
              serviceConfig = option (types.attrsOf types.anything) { };
              script = option types.lines "";
              enable = option types.bool true;
              name = option types.str "${name}.service";
            };
            config.serviceConfig.SyslogIdentifier = lib.mkDefault name;
          }
        )
      )) { };
      sockets = option (types.attrsOf (
        types.submodule {
          options = {
            listenStreams = option (types.listOf types.str) [ ];
            socketConfig = option (types.attrsOf types.anything) { };
            wantedBy = option (types.listOf types.str) [ ];
          };
        }
      )) { };
    };
  };
  units = evalConfig [
    unitsModule
    {
      systemd.services.a = {
        after = [ "network.target" ];
        serviceConfig = {
          ExecStart = "/bin/a";
          Nice = lib.mkIf false 5;
          LimitNOFILE = lib.mkDefault 1024;
          Environment = [ "A=1" ];
        };
        script = "echo one";
      };
      systemd.sockets.a = {
        listenStreams = [ "127.0.0.1:3003" ];
        socketConfig.Accept = false;
        wantedBy = [ "sockets.target" ];
      };
    }
    (
      { config, ... }:
      {
        systemd.services.a = {
          after = lib.mkBefore [ "first.target" ];
          serviceConfig.LimitNOFILE = 65536;
          script = lib.mkAfter "echo last";
          environment.PKG = fakePackage "hello-1.0";
          environment.UNSET = null;
        };
        # Another option's value decides (a service's own would be an infinite recursion).
        systemd.services.b = lib.mkIf (config.systemd.sockets.a.wantedBy != [ ]) {
          description = "b, with a's socket";
          serviceConfig.Restart = "always";
        };
        systemd.sockets.a.socketConfig.Backlog = 64;
      }
    )
    { systemd.services.a.script = lib.mkOrder 600 "echo early"; }
  ];
in
plain {
  inherit units;
  conflictingListsInAnything = evalConfig [
    unitsModule
    { systemd.services.a.serviceConfig.Environment = [ "A=1" ]; }
    { systemd.services.a.serviceConfig.Environment = [ "B=1" ]; }
  ];

  priorities = {
    plainBeatsDefault = merged types.int [
      (lib.mkDefault 1)
      2
    ];
    forceBeatsPlain = merged types.int [
      (lib.mkForce 3)
      2
    ];
    optionDefaultLoses = merged types.int [
      (lib.mkOptionDefault 1)
      (lib.mkDefault 2)
    ];
    overrideNumber = merged types.int [
      (lib.mkOverride 900 4)
      (lib.mkDefault 5)
    ];
    equalPlainConflict = merged types.int [
      1
      2
    ];
    equalPlainSame = merged types.int [
      1
      1
    ];
    listsAtOnePriority = merged (types.listOf types.int) [
      [ 1 ]
      (lib.mkDefault [ 2 ])
      [ 3 ]
    ];
    forceInsideIf = merged types.str [
      (lib.mkIf true (lib.mkForce "forced"))
      "plain"
    ];
    ifInsideForce = merged (types.attrsOf types.int) [
      (lib.mkForce { a = lib.mkIf false 1; b = 2; })
      { c = 3; }
    ];
    defaultOfOption =
      (evalConfig [
        { options.o = option types.str "declared"; }
        { o = lib.mkDefault "mkDefault"; }
      ]).o;
    onlyDefault = (evalConfig [ { options.o = option types.str "declared"; } ]).o;
    undefined = (evalConfig [ { options.o = mkOption { type = types.str; }; } ]).o;
  };

  properties = {
    ifFalseDropsAttr = merged (types.attrsOf types.int) [
      {
        a = lib.mkIf false 1;
        b = 2;
      }
    ];
    ifInList = merged (types.listOf types.int) [
      [
        1
        (lib.mkIf false 2)
        (lib.mkIf true 3)
      ]
    ];
    mergeOfIfs = merged (types.listOf types.str) [
      (lib.mkMerge [
        (lib.mkIf true [ "a" ])
        (lib.mkIf false [ "b" ])
        [ "c" ]
      ])
    ];
    nonBoolCondition = merged types.int [ (lib.mkIf "yes" 1) ];
    order = merged (types.listOf types.str) [
      (lib.mkAfter [ "after" ])
      [ "plain1" ]
      (lib.mkBefore [ "before" ])
      [ "plain2" ]
      (lib.mkOrder 1000 [ "order1000" ])
    ];
    linesOrder = merged types.lines [
      "b"
      (lib.mkBefore "a")
      (lib.mkAfter "c")
    ];
    commas = merged types.commas [
      "a"
      "b"
    ];
    separated = merged (types.separatedString " ") [
      "a"
      "b"
    ];
  };

  # The configuration tests itself: conditions are evaluated only once the structure is known.
  selfReference = evalConfig [
    {
      options.enable = option types.bool false;
      options.port = option types.port 80;
      options.ports = option (types.listOf types.port) [ ];
      options.extra = option (types.attrsOf types.str) { };
    }
    (
      { config, ... }:
      {
        config = lib.mkMerge [
          (lib.mkIf config.enable { ports = [ config.port ]; })
          (lib.mkIf (!config.enable) { extra.disabled = "yes"; })
          { extra.port = toString config.port; }
        ];
      }
    )
    { enable = true; }
    { port = lib.mkForce 8080; }
  ];

  # Properties around a set of options reach every option in it.
  setLevelProperties = evalConfig [
    {
      options.s = {
        a = option types.int 0;
        b = option types.int 0;
        c = option (types.listOf types.int) [ ];
      };
    }
    {
      s = lib.mkDefault {
        a = 1;
        b = 1;
      };
    }
    { s.b = 2; }
    {
      s = lib.mkMerge [
        (lib.mkIf false { a = 9; })
        { c = [ 1 ]; }
        (lib.mkForce { c = [ 2 ]; })
      ];
    }
  ];

  typesAccept =
    let
      accepts = type: value: (builtins.tryEval (builtins.deepSeq (merged type [ value ]) true)).success;
    in
    {
      pathAbsolute = accepts types.path "/a";
      pathRelative = accepts types.path "a";
      pathStorePath = accepts types.path ./stand-in.nix;
      strInt = accepts types.str 1;
      intBool = accepts types.int true;
      portHigh = accepts types.port 65536;
      portZero = accepts types.port 0;
      positiveZero = accepts types.ints.positive 0;
      unsignedZero = accepts types.ints.unsigned 0;
      betweenEdge = accepts (types.ints.between (-20) 19) (-20);
      betweenOut = accepts (types.ints.between (-20) 19) 20;
      u8 = accepts types.ints.u8 255;
      s8 = accepts types.ints.s8 (-129);
      enumIn = accepts (types.enum [ "a" 1 ]) 1;
      enumOut = accepts (types.enum [ "a" ]) "b";
      strMatching = accepts (types.strMatching "[0-9]+[smh]") "10s";
      strMatchingNot = accepts (types.strMatching "[0-9]+[smh]") "10 s";
      packageDrv = accepts types.package (fakePackage "p-1");
      packageAttrs = accepts types.package { name = "p"; };
      nullOrNull = accepts (types.nullOr types.int) null;
      eitherSecond = accepts (types.either types.int types.str) "s";
      oneOfNone = accepts (types.oneOf [
        types.int
        types.bool
      ]) "s";
      listOfBad = accepts (types.listOf types.int) [ "s" ];
      attrsOfBad = accepts (types.attrsOf types.int) { a = "s"; };
      submoduleAttrs = accepts (types.submodule { }) { };
      submoduleUnknown = accepts (types.submodule { }) { unknown = 1; };
      linesInt = accepts types.lines 1;
      floatInt = accepts types.float 1;
      float = accepts types.float 1.5;
      nonEmptyStrBlank = accepts types.nonEmptyStr " ";
      nonEmptyStr = accepts types.nonEmptyStr "a";
      singleLineTwo = accepts types.singleLineStr "a\nb";
      singleLineEnd = merged types.singleLineStr [ "a\n" ];
    };

  mergedValues = {
    nullMixed = merged (types.nullOr types.int) [
      null
      1
    ];
    nullBoth = merged (types.nullOr types.int) [
      null
      null
    ];
    eitherIntStr = merged (types.either types.int types.str) [ "x" ];
    eitherMixed = merged (types.either types.int types.str) [
      1
      "x"
    ];
    coerced = merged (types.listOf (types.coercedTo types.str (address: { inherit address; }) (types.submodule {
      options.address = mkOption { type = types.str; };
      options.weight = option types.int 1;
    }))) [
      [ "a:1" ]
      [
        {
          address = "b:2";
          weight = 3;
        }
      ]
    ];
    coercedInt = merged (types.coercedTo types.int toString types.str) [ 5 ];
    unspecifiedLists = merged types.unspecified [
      [ 1 ]
      [ 2 ]
    ];
    unspecifiedAttrs = merged types.unspecified [
      { a = 1; }
      { b = 2; }
    ];
    unspecifiedBools = merged types.unspecified [
      false
      true
    ];
    anythingNested = merged types.anything [
      {
        a.b = 1;
        a.c = lib.mkIf false 2;
        f = "x";
      }
      {
        a.d = [ 3 ];
        f = lib.mkForce "y";
      }
    ];
    anythingFunctions = (merged types.anything [ (x: { a = x; }) (x: { b = x; }) ]) 7;
    anythingPackage = merged types.anything [ (fakePackage "p-1") ];
    attrsNested = merged (types.attrsOf (types.attrsOf types.str)) [
      { a.x = "1"; }
      {
        a.y = "2";
        b.z = lib.mkIf false "3";
      }
    ];
    lazyAttrs = builtins.attrNames (merged (types.lazyAttrsOf types.int) [
      {
        a = 1;
        b = lib.mkIf false 2;
      }
    ]);
    packageTwice = merged types.package [
      (fakePackage "p-1")
      (fakePackage "p-1")
    ];
    attrsType = merged types.attrs [
      { a.b = 1; }
      { a.c = 2; }
    ];
    uniqTwice = merged (types.uniq types.str) [
      "a"
      "a"
    ];
  };

  submodules = {
    namedWithDefaults = evalConfig [
      {
        options.servers = option (types.attrsOf (types.submodule (
          { name, config, ... }:
          {
            options.host = option types.str name;
            options.port = option types.port 3003;
            options.url = option types.str "http://${config.host}:${toString config.port}";
          }
        ))) { };
      }
      { servers.alpha.port = 3004; }
      { servers.beta.host = "10.0.0.2"; }
      { servers.alpha.host = lib.mkDefault "ignored-default"; }
    ];
    freeform = evalConfig [
      {
        options.settings = option (types.submodule {
          freeformType = types.attrsOf (types.oneOf [
            types.str
            types.int
            types.bool
          ]);
          options.PORT = option types.port 3003;
        }) { };
      }
      { settings.EXTRA = "x"; }
      { settings.PORT = 3005; }
      { settings.FLAG = lib.mkIf true true; }
    ];
    topLevelFreeform =
      (lib.evalModules {
        modules = [
          { freeformType = types.attrsOf types.str; }
          { options.declared = option types.str "d"; }
          { free = "f"; }
        ];
      }).config;
    unknownOption = evalConfig [
      { options.known = option types.int 1; }
      { unknown = 2; }
    ];
    unknownInSubmodule =
      (evalConfig [
        { options.sub = option (types.submodule { options.known = option types.int 1; }) { }; }
        { sub.unknown = 2; }
      ]).sub;
    declaredTwice = evalConfig [
      { options.sub = option (types.submodule { options.a = option types.int 1; }) { }; }
      { options.sub = mkOption { type = types.submodule { options.b = option types.int 2; }; }; }
      { sub.a = 3; }
    ];
    listOfSubmodules = evalConfig [
      {
        options.items = option (types.listOf (types.submodule (
          { name, ... }:
          {
            options.tag = option types.str "item";
          }
        ))) [ ];
      }
      { items = [ { } ]; }
      { items = [ { tag = "second"; } ]; }
    ];
  };

  modules = {
    args = evalConfig [
      { _module.args.greeting = "hello"; }
      (
        { greeting, ... }:
        {
          options.o = option types.str greeting;
        }
      )
    ];
    specialArgs =
      (lib.evalModules {
        specialArgs.flavour = "special";
        modules = [
          (
            { flavour, ... }:
            {
              options.o = option types.str flavour;
            }
          )
        ];
      }).config;
    disabled =
      let
        extra = {
          key = "extra-module";
          options.o = option types.str "from extra";
        };
      in
      evalConfig [
        extra
        { options.o = option types.str "kept"; }
        { disabledModules = [ { key = "extra-module"; } ]; }
      ];
    disabledWithoutModulesPath = evalConfig [ { disabledModules = [ "services/x.nix" ]; } ];
    imports = evalConfig [
      { options.l = option (types.listOf types.str) [ ]; }
      {
        imports = [
          { l = [ "imported" ]; }
          ({ ... }: { l = [ "function" ]; })
        ];
        l = [ "importer" ];
      }
      { l = [ "last" ]; }
    ];
    apply = evalConfig [
      {
        options.o = mkOption {
          type = types.int;
          default = 1;
          apply = x: x * 10;
        };
      }
      { o = 2; }
    ];
    readOnlyTwice = evalConfig [
      {
        options.o = mkOption {
          type = types.int;
          readOnly = true;
        };
      }
      { o = 1; }
      { o = 1; }
    ];
    structuredWithStray = evalConfig [
      {
        options.o = option types.int 1;
        config.o = 2;
        stray = 3;
      }
    ];
    metaAtTop = evalConfig [
      {
        options.meta.maintainers = option (types.listOf types.str) [ ];
        options.o = option types.int 1;
        config.o = 2;
        meta.maintainers = [ "someone" ];
      }
    ];
    optionsArgument =
      let
        e = lib.evalModules {
          modules = [
            { options.o = option types.int 1; }
            { o = lib.mkDefault 2; }
            { o = lib.mkDefault 2; }
          ];
        };
      in
      {
        inherit (e.options.o) isDefined highestPrio definitions;
        files = e.options.o.files;
        loc = e.options.o.loc;
        defaultLoc = e.options.o.default;
        value = e.options.o.value;
      };
  };

  # Each kind of rename on its own, with and without definitions of the old path.
  renames =
    let
      target = imports: {
        options.new = option (types.attrsOf types.str) { };
        options.newInt = option types.int 0;
        options.warnings = option (types.listOf types.str) [ ];
        options.assertions = option (types.listOf types.unspecified) [ ];
        inherit imports;
      };
      outcome =
        rename: definitions:
        let
          evaluated = lib.evalModules {
            modules = [
              (target [ rename ])
              definitions
            ];
          };
          config = evaluated.config;
        in
        {
          inherit (config) new newInt warnings;
          failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
          visible = map (option: option.visible or true) (
            builtins.filter (option: (option._type or "") == "option") (builtins.attrValues evaluated.options)
          );
        };
      renamed = lib.mkRenamedOptionModule [ "old" ] [ "new" ];
      alias = lib.mkAliasOptionModule [ "alias" ] [ "newInt" ];
      removed = lib.mkRemovedOptionModule [ "gone" ] "Use `new` instead.";
      changed = lib.mkChangedOptionModule [ "changed" ] [ "newInt" ] (config: builtins.stringLength config.changed);
    in
    {
      renamedUnused = outcome renamed { };
      renamed = outcome renamed {
        old.a = lib.mkDefault "1";
        new.a = "2";
        old.b = "3";
      };
      renamedForced = outcome renamed {
        old = lib.mkForce { a = "forced"; };
        new.a = "2";
      };
      renamedWrongType = outcome renamed { old.a = 1; };
      aliasUnused = outcome alias { };
      alias = outcome alias { alias = 7; };
      removedUnused = outcome removed { };
      removed = outcome removed { gone = 1; };
      changedUnused = outcome changed { };
      changed = outcome changed { changed = "four"; };
      descriptions = map (option: option.description or null) (
        builtins.attrValues
          (lib.evalModules {
            modules = [
              (target [
                renamed
                alias
              ])
            ];
          }).options
      );
    };

  options =
    let
      pkgs.hello = fakePackage "hello-1";
      pkgs.nested.tool = fakePackage "tool-1";
      describe = o: {
        inherit (o) description;
        type = o.type.description;
        default = o.default or "<none>";
        defaultText = o.defaultText or null;
        example = o.example or null;
      };
    in
    map describe [
      (lib.mkEnableOption "the thing")
      (lib.mkPackageOption pkgs "hello" { })
      (lib.mkPackageOption pkgs "hello" {
        extraDescription = "More.";
        example = "hello";
      })
      (lib.mkPackageOption pkgs [ "nested" "tool" ] { nullable = true; })
      (lib.mkPackageOption pkgs "tool" { default = [ "nested" "tool" ]; })
      (mkOption {
        type = types.str;
        default = "x";
        defaultText = lib.literalExpression "config.x";
        example = lib.literalExpression "\"y\"";
        description = "An option.";
      })
    ];

  typeDescriptions = map (type: type.description) (
    with types;
    [
      str
      bool
      int
      port
      float
      path
      package
      anything
      unspecified
      raw
      attrs
      lines
      commas
      (separatedString ":")
      (strMatching "[a-z]+")
      (enum [ ])
      (enum [ "a" ])
      (enum [ "a" 1 true ])
      ints.positive
      ints.unsigned
      ints.u8
      ints.u16
      ints.u32
      ints.s8
      ints.s16
      ints.s32
      (ints.between 0 5)
      (listOf str)
      (listOf ints.positive)
      (listOf (nullOr str))
      (listOf (listOf str))
      (listOf (submodule { }))
      (nonEmptyListOf str)
      (attrsOf str)
      (attrsOf (attrsOf anything))
      (attrsOf (oneOf [ str int bool ]))
      (attrsOf (submodule { }))
      (lazyAttrsOf str)
      (nullOr str)
      (nullOr ints.positive)
      (nullOr (listOf str))
      (nullOr (nullOr str))
      (nullOr (submodule { }))
      (either str int)
      (either int (listOf str))
      (either (listOf str) int)
      (either ints.positive str)
      (either str ints.positive)
      (either (submodule { }) str)
      (oneOf [ str int bool ])
      (coercedTo str (x: x) (listOf str))
      (coercedTo int toString str)
      (listOf (coercedTo str (x: { }) (submodule { })))
      (uniq str)
      nonEmptyStr
      singleLineStr
      (submodule { })
    ]
  );

  helpers = {
    strings = {
      split = lib.splitString "." "a.b..c.";
      splitNewline = lib.splitString "\n" "a\nb";
      splitMulti = lib.splitString "::" "a::b:c";
      suffix = [
        (lib.hasSuffix ".nix" "a.nix")
        (lib.hasSuffix "a.nix" ".nix")
        (lib.toUpper "ab-c")
        (lib.toLower "AB-C")
        (lib.concatLines [
          "a"
          "b"
        ])
      ];
      trim = map lib.trim [
        "  a b \n"
        "\t"
        ""
        "x"
      ];
      infix = map (infix: lib.hasInfix infix "a.b[c]\nd") [
        "."
        "b[c]"
        "]\nd"
        ""
        "x"
        "a.b[c]\nd"
      ];
      prefixes = [
        (lib.hasPrefix "" "a")
        (lib.hasPrefix "ab" "a")
        (lib.removePrefix "/var/cache/" "/var/cache/immich-ml")
        (lib.removePrefix "x" "abc")
        (lib.removeSuffix "/" "/srv/models/")
        (lib.removeSuffix "abc" "bc")
      ];
      concat = [
        (lib.concatStringsSep ", " [
          "a"
          "b"
        ])
        (lib.concatMapStringsSep "," toString [
          1
          2
        ])
        (lib.concatMapStrings (x: x + ";") [
          "a"
          "b"
        ])
        (lib.concatStrings [
          "a"
          "b"
        ])
        (lib.optionalString false "no")
        (lib.optionalString true "yes")
        (lib.boolToString false)
        (lib.replaceStrings [ "." ] [ "/" ] "immich_ml.cli")
      ];
      versions = map (pair: lib.versionOlder (builtins.elemAt pair 0) (builtins.elemAt pair 1)) [
        [
          "75.1.0"
          "77"
        ]
        [
          "80.9.0"
          "77"
        ]
        [
          "77"
          "77"
        ]
        [
          "77.0.1"
          "77"
        ]
        [
          "1.2pre"
          "1.2"
        ]
      ];
    };
    lists = {
      optional = lib.optional true 1 ++ lib.optional false 2 ++ lib.optionals true [ 3 ] ++ lib.optionals false [ 4 ];
      unique = lib.unique [
        3
        1
        3
        2
        1
      ];
      anyAll = [
        (lib.any (x: x > 2) [
          1
          3
        ])
        (lib.all (x: x > 2) [
          1
          3
        ])
        (lib.all (x: false) [ ])
        (lib.elem 2 [
          1
          2
        ])
      ];
      length = lib.length (lib.filter (x: x != 2) [
        1
        2
        3
      ]);
    };
    attrsets = {
      listToAttrs = lib.listToAttrs [
        (lib.nameValuePair "b" 1)
        (lib.nameValuePair "a" 2)
        (lib.nameValuePair "b" 3)
      ];
      mapAttrsToList = lib.mapAttrsToList (name: value: "${name}=${toString value}") {
        z = 1;
        a = 2;
      };
      genAttrs = lib.genAttrs [
        "x"
        "y"
      ] (name: name + name);
      filterAttrs = lib.filterAttrs (name: value: value != "") {
        a = "";
        b = "x";
      };
      optionalAttrs = lib.optionalAttrs false { a = 1; } // lib.optionalAttrs true { b = 2; };
      mapAttrs = lib.mapAttrs (name: value: name + value) { a = "1"; };
      mapAttrsRenamed = lib.mapAttrs' (name: value: lib.nameValuePair "x-${name}" value) { a = 1; };
      recursiveUpdate = lib.recursiveUpdate {
        a.b = 1;
        a.c = 2;
        d = 1;
      } {
        a.b = 3;
        d.e = 4;
      };
      attrByPath = [
        (lib.attrByPath [ "a" "b" ] 0 { a.b = 1; })
        (lib.attrByPath [ "a" "x" ] 0 { a.b = 1; })
        (lib.hasAttrByPath [ "a" "b" ] { a.b = null; })
        (lib.hasAttrByPath [ "a" "b" "c" ] { a.b = 1; })
      ];
      attrNames = lib.attrNames {
        b = 1;
        a = 2;
        "B" = 3;
      };
      attrValues = lib.attrValues {
        b = 1;
        a = 2;
      };
      functionArgs = map lib.functionArgs [
        ({ a, b ? 1 }: a)
        (x: x)
        {
          __functor = self: { c }: c;
        }
        {
          __functor = self: x: x;
          __functionArgs = { d = false; };
        }
      ];
      isBool = [
        (lib.isBool true)
        (lib.isBool "true")
      ];
    };
    packages = {
      exe = lib.getExe (fakePackage "hello-2.12");
      exeNamed = lib.getExe' (fakePackage "hello-2.12") "hi";
      exeOutputs = lib.getExe' (fakePackage "multi-1" // { bin = fakePackage "multi-1-bin"; }) "m";
      name = map lib.getName [
        (fakePackage "hello-2.12")
        ((fakePackage "x-1") // { pname = "pname-wins"; })
        "plain-3.1"
      ];
      binPath = lib.makeBinPath [
        (fakePackage "a-1")
        (fakePackage "b-1" // { bin = fakePackage "b-1-bin"; })
      ];
      libraryPath = lib.makeLibraryPath [ (fakePackage "c-1" // { lib = fakePackage "c-1-lib"; }) ];
      shellArgs = lib.escapeShellArgs [
        "a b"
        "it's"
        ""
      ];
      versions = map (f: f "12.3.4") [
        lib.versions.major
        lib.versions.minor
        lib.versions.majorMinor
      ];
      license = lib.licenses.agpl3Plus.spdxId;
      linux = builtins.elem "x86_64-linux" lib.platforms.linux && builtins.elem "aarch64-linux" lib.platforms.linux;
      toml = (lib.importTOML ../../pyproject.toml).project.name;
    };
  };
}
