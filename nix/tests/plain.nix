# A value as plain data, for comparing what two libraries evaluate to: packages become their store
# path, functions a marker, paths strings, and a value that fails to evaluate says so.
lib:
let
  plain =
    value:
    let
      attempt = builtins.tryEval (builtins.deepSeq value value);
    in
    if !attempt.success then
      "<evaluation error>"
    else if lib.isDerivation value then
      "<package ${value.outPath}>"
    else if builtins.isFunction value then
      "<function>"
    else if builtins.isPath value then
      toString value
    else if builtins.isList value then
      map plain value
    else if builtins.isAttrs value then
      builtins.mapAttrs (_: plain) value
    else
      value;
in
plain
