# String helpers of the stand-in library, written from the behaviour the nixpkgs manual documents.
{ lib }:

let
  whitespace = [
    " "
    "\t"
    "\n"
    "\r"
  ];
  charAt = s: i: builtins.substring i 1 s;
  # The first index from `start`, stepping by `step`, whose character is not whitespace.
  skipWhitespace =
    s: start: step:
    let
      go = i: if i >= 0 && i < builtins.stringLength s && builtins.elem (charAt s i) whitespace then go (i + step) else i;
    in
    go start;
  # Each character a POSIX extended regular expression treats specially, and its literal form.
  regexSpecials = lib.stringToCharacters "[{}()$?*+|.";
  regexEscapes = map (c: "[${c}]") regexSpecials ++ [
    "\\\\"
    "\\^"
  ];
in
rec {
  inherit (builtins) concatStringsSep replaceStrings stringLength substring;

  concatStrings = builtins.concatStringsSep "";
  concatMapStrings = f: list: concatStrings (map f list);
  concatMapStringsSep = sep: f: list: builtins.concatStringsSep sep (map f list);
  concatLines = list: concatMapStrings (line: line + "\n") list;
  optionalString = condition: s: if condition then s else "";
  boolToString = b: if b then "true" else "false";
  stringToCharacters = s: builtins.genList (i: builtins.substring i 1 s) (builtins.stringLength s);

  hasPrefix =
    prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;
  hasSuffix =
    suffix: s:
    let
      n = builtins.stringLength s;
      k = builtins.stringLength suffix;
    in
    n >= k && builtins.substring (n - k) k s == suffix;
  hasInfix = infix: s: infix == "" || builtins.length (builtins.split (escapeRegex infix) s) > 1;
  removePrefix = prefix: s: if hasPrefix prefix s then builtins.substring (builtins.stringLength prefix) (-1) s else s;
  removeSuffix =
    suffix: s:
    if hasSuffix suffix s then builtins.substring 0 (builtins.stringLength s - builtins.stringLength suffix) s else s;

  escapeRegex = replaceStrings (regexSpecials ++ [ "\\" "^" ]) regexEscapes;
  splitString = sep: s: builtins.filter builtins.isString (builtins.split (escapeRegex sep) s);

  trim =
    s:
    let
      first = skipWhitespace s 0 1;
      last = skipWhitespace s (builtins.stringLength s - 1) (-1);
    in
    if first > last then "" else builtins.substring first (last - first + 1) s;

  toUpper = replaceStrings (stringToCharacters "abcdefghijklmnopqrstuvwxyz") (stringToCharacters "ABCDEFGHIJKLMNOPQRSTUVWXYZ");
  toLower = replaceStrings (stringToCharacters "ABCDEFGHIJKLMNOPQRSTUVWXYZ") (stringToCharacters "abcdefghijklmnopqrstuvwxyz");
  escapeShellArg = arg: "'${replaceStrings [ "'" ] [ "'\\''" ] (toString arg)}'";
  escapeShellArgs = args: builtins.concatStringsSep " " (map escapeShellArg args);
  makeSearchPath = subdir: packages: builtins.concatStringsSep ":" (map (p: "${toString p}/${subdir}") packages);
  makeBinPath = packages: makeSearchPath "bin" (map lib.getBin packages);
  makeLibraryPath = packages: makeSearchPath "lib" (map lib.getLib packages);
  isStringLike = x: builtins.isString x || builtins.isPath x || x ? outPath || x ? __toString;

  versionOlder = a: b: builtins.compareVersions a b < 0;
  versions = {
    splitVersion = builtins.splitVersion;
    major = v: builtins.elemAt (builtins.splitVersion v) 0;
    minor = v: builtins.elemAt (builtins.splitVersion v) 1;
    patch = v: builtins.elemAt (builtins.splitVersion v) 2;
    majorMinor = v: "${builtins.elemAt (builtins.splitVersion v) 0}.${builtins.elemAt (builtins.splitVersion v) 1}";
  };
}
