# Modules that keep an old option path working or explain its removal: the old path becomes a
# hidden option whose definitions go to the new one (with a warning), or that fails an assertion.
{ lib }:

let
  inherit (lib.options) mkOption showFiles showOption;
  inherit (lib.modules) mkIf mkMerge mkOverride;

  # `from` forwards its definitions, at their priority, to `to`.
  rename =
    {
      from,
      to,
      visible,
      warn,
      use,
    }:
    { config, options, ... }:
    let
      fromOpt = lib.getAttrFromPath from options;
      target = lib.attrByPath to { } options;
    in
    {
      options = lib.setAttrByPath from (
        mkOption (
          {
            inherit visible;
            description = "Alias of {option}`${showOption to}`.";
            apply =
              _:
              use (lib.attrByPath to (throw "Renaming error: option `${showOption to}' does not exist.") config);
          }
          // lib.optionalAttrs (target ? type) { inherit (target) type; }
        )
      );
      config = mkMerge [
        (lib.optionalAttrs warn {
          warnings = lib.optional fromOpt.isDefined "The option `${showOption from}' defined in ${showFiles fromOpt.files} has been renamed to `${showOption to}'.";
        })
        (lib.setAttrByPath to (mkIf fromOpt.isDefined (mkMerge (map (mkOverride fromOpt.highestPrio) fromOpt.definitions))))
      ];
    };
in
{
  mkRenamedOptionModule =
    from: to:
    rename {
      inherit from to;
      visible = false;
      warn = true;
      use = builtins.trace "Obsolete option `${showOption from}' is used. It was renamed to `${showOption to}'.";
    };
  mkAliasOptionModule =
    from: to:
    rename {
      inherit from to;
      visible = true;
      warn = false;
      use = lib.id;
    };

  mkRemovedOptionModule =
    optionName: replacementInstructions:
    { options, ... }:
    {
      options = lib.setAttrByPath optionName (mkOption {
        visible = false;
        apply = _: throw "The option `${showOption optionName}' can no longer be used since it's been removed. ${replacementInstructions}";
      });
      config.assertions =
        let
          opt = lib.getAttrFromPath optionName options;
        in
        [
          {
            assertion = !opt.isDefined;
            message = ''
              The option definition `${showOption optionName}' in ${showFiles opt.files} no longer has any effect; please remove it.
              ${replacementInstructions}
            '';
          }
        ];
    };

  # The old options (several for a merge, one for a change) feed `mergeFn config` into `to`.
  mkMergedOptionModule =
    from: to: mergeFn:
    { config, options, ... }:
    let
      unset = "_mkMergedOptionModule";
      isSet = path: lib.getAttrFromPath path config != unset;
    in
    {
      options = builtins.foldl' lib.recursiveUpdate { } (
        map (
          path:
          lib.setAttrByPath path (mkOption {
            visible = false;
            default = unset;
          })
        ) from
      );
      config = {
        warnings = map (
          path:
          "The option `${showOption path}' defined in ${showFiles (lib.getAttrFromPath path options).files} has been changed to `${showOption to}' that has a different type. Please read `${showOption to}' documentation and update your configuration accordingly."
        ) (builtins.filter isSet from);
      }
      // lib.setAttrByPath to (mkMerge (lib.optional (builtins.any isSet from) (mergeFn config)));
    };
  mkChangedOptionModule =
    from: to: changeFn:
    lib.mkMergedOptionModule [ from ] to changeFn;
}
