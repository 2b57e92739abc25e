# What nix/package.nix gives nixpkgs' buildPythonApplication, evaluated against a stub package set
# that records it (nix/buildsim/simulate.py builds and checks the package from this record).
#
#   nix-instantiate --eval --strict --json nix/buildsim/record.nix \
#     --arg lib 'import LIB' --argstr storeDir /tmp/store [--arg package ./copy/nix/package.nix]
#
# Every stub derivation is a store path under `storeDir`, named by one rule that simulate.py turns
# back into a local file or folder ("realises"):
#   <storeDir>/python3                          the interpreter (python.interpreter = …/bin/python3.X)
#   <storeDir>/python3Packages/<attr>           a Python package of the set, installed from PyPI
#   <storeDir>/pkgs/<attr>                      a system package (fonts, nginx, nodejs, openssl, util-linux)
#   <storeDir>/pypi/<python>/<hash>/<file>.whl  a fetchPypi wheel; <hash> is the SRI hash's base64
#                                               with `/` written `_` and `+` written `-`
#   <storeDir>/source, <storeDir>/<pname>-<version>  the `src` fileset's copy and `$out`
# Python packages and system packages are the names in inputs.json: an attribute package.nix uses
# that is not listed there fails the evaluation (add it, with its PyPI name or host files).
{
  lib,
  storeDir,
  package ? ../package.nix,
  pythonVersion ? "3.11",
  cudaSupport ? false,
}:

let
  inputs = builtins.fromJSON (builtins.readFile ./inputs.json);

  derivation = kind: attr: extra: {
    type = "derivation";
    name = attr;
    outPath = "${storeDir}/${kind}/${attr}";
    buildsim = { inherit kind attr; };
  } // extra;

  pythonPackage =
    attr: spec:
    derivation "python3Packages" attr {
      pname = attr;
      inherit (spec) version;
      # package.nix overrides onnxruntime and rapidocr; the simulation installs the PyPI build either way.
      override = _: pythonPackage attr spec;
    };

  python = {
    type = "derivation";
    outPath = "${storeDir}/python3";
    interpreter = "${storeDir}/python3/bin/python${pythonVersion}";
    inherit pythonVersion;
  };

  # A recording lib.fileset: a file set is the list of the absolute paths that were named.
  fileset =
    let
      toList =
        set:
        if builtins.isPath set then
          (
            if builtins.pathExists set then
              [ (toString set) ]
            else
              throw "lib.fileset: ${toString set} does not exist"
          )
        else
          set;
    in
    {
      unions = sets: builtins.concatMap toList sets;
      union = a: b: toList a ++ toList b;
      maybeMissing = path: if builtins.pathExists path then [ (toString path) ] else [ ];
      toSource =
        { root, fileset }:
        {
          outPath = "${storeDir}/source";
          buildsimFileset = {
            root = toString root;
            paths = toList fileset;
          };
        };
    };

  recordingLib = lib // {
    inherit fileset;
  };

  fetchPypi =
    {
      pname,
      version,
      hash,
      format ? "setuptools",
      dist ? "py2.py3",
      python ? "py2.py3",
      abi ? "none",
      platform ? "any",
      ...
    }:
    let
      file =
        if format == "wheel" then
          "${pname}-${version}-${dist}-${abi}-${platform}.whl"
        else
          "${pname}-${version}.tar.gz";
      encoded = builtins.replaceStrings [ "/" "+" ] [ "_" "-" ] hash;
    in
    {
      type = "derivation";
      outPath = "${storeDir}/pypi/${python}/${encoded}/${file}";
    };

  python3Packages =
    builtins.mapAttrs pythonPackage inputs.python
    // {
      inherit python;
      buildPythonApplication = attrs: attrs;
    };

  systemPackages = builtins.mapAttrs (attr: _: derivation "pkgs" attr { }) inputs.system;

  given = import package (
    {
      lib = recordingLib;
      config.cudaSupport = cudaSupport;
      stdenv.hostPlatform = {
        isLinux = true;
        isAarch64 = false;
      };
      inherit python3Packages fetchPypi;
    }
    // systemPackages
  );

  names = map (input: if input ? buildsim then input.buildsim else throw "not a stub package: ${toString input}");
  optional = name: default: given.${name} or default;
in
{
  inherit storeDir pythonVersion;
  pname = given.pname;
  version = given.version;
  out = "${storeDir}/${given.pname}-${given.version}";
  src = given.src.buildsimFileset;
  buildSystem = names (optional "build-system" [ ]);
  dependencies = names (optional "dependencies" [ ]);
  nativeCheckInputs = names (optional "nativeCheckInputs" [ ]);
  disabledTests = optional "disabledTests" [ ];
  disabledTestPaths = optional "disabledTestPaths" [ ];
  disabledTestMarks = optional "disabledTestMarks" [ ];
  pytestFlags = optional "pytestFlags" [ ];
  pytestFlagsArray = optional "pytestFlagsArray" [ ];
  PYTEST_ADDOPTS = optional "PYTEST_ADDOPTS" null;
  postPatch = optional "postPatch" "";
  preCheck = optional "preCheck" "";
  postCheck = optional "postCheck" "";
  pythonImportsCheck = optional "pythonImportsCheck" [ ];
  pythonRelaxDeps = optional "pythonRelaxDeps" false;
  doCheck = optional "doCheck" true;
}
