# immich-ml as a Python application. `cudaSupport = true` swaps in an onnxruntime built with CUDA
# for this package only (nothing else in the package set is rebuilt):
#
#   pkgs.callPackage ./nix/package.nix { cudaSupport = true; }
#
# CUDA libraries are unfree: the nixpkgs instance needs them allowed (the flake's `cuda` output
# does that for the CUDA licences only). `nixpkgs.config.cudaCapabilities = [ "8.6" ]` limits the
# build to your GPU's architecture and cuts the onnxruntime build time several-fold.
{
  lib,
  stdenv,
  python3Packages,
  cudaSupport ? false,
}:

let
  pyproject = lib.importTOML ../pyproject.toml;

  # nixpkgs defines python3Packages.onnxruntime from the top-level onnxruntime (with
  # pythonSupport); override that inner package so the Python module and the C++ library match.
  onnxruntime =
    if cudaSupport then
      python3Packages.onnxruntime.override (previous: {
        onnxruntime = previous.onnxruntime.override {
          cudaSupport = true;
          ncclSupport = false; # one process, one GPU per session: NCCL only adds build time
        };
      })
    else
      python3Packages.onnxruntime;
in
python3Packages.buildPythonApplication {
  pname = if cudaSupport then "immich-ml-cuda" else "immich-ml";
  inherit (pyproject.project) version;
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../service
      ../tests
      (lib.fileset.maybeMissing ../scripts)
      (lib.fileset.maybeMissing ../README.md)
    ];
  };

  build-system = [ python3Packages.setuptools ];

  dependencies =
    (with python3Packages; [
      aiohttp
      huggingface-hub
      numpy
      nvidia-ml-py
      opencv-python-headless
      orjson
      pillow
      prometheus-client
      sdnotify
      tokenizers
    ])
    ++ [ onnxruntime ];

  # nixpkgs' versions are what we test against; lower bounds in pyproject.toml are advisory here.
  pythonRelaxDeps = true;

  nativeCheckInputs = with python3Packages; [
    hypothesis
    onnx
    pytest-aiohttp
    pytestCheckHook
  ];

  preCheck = ''
    export HOME=$(mktemp -d)
  '';

  # The tests never touch a GPU; the CUDA build runs them too (onnxruntime falls back to CPU).
  # On aarch64-linux onnxruntime aborts at import in the build sandbox (its cpuinfo reads
  # /sys/devices/system/cpu, which the sandbox lacks), as nixpkgs' own onnxruntime notes.
  doCheck = !(stdenv.hostPlatform.isLinux && stdenv.hostPlatform.isAarch64);

  pythonImportsCheck = [ "immich_ml" ];

  passthru = {
    inherit cudaSupport onnxruntime;
    # nixpkgs' onnxruntime has no TensorRT execution provider (open PR NixOS/nixpkgs#509976).
    tensorrtSupport = false;
  };

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.agpl3Plus;
    mainProgram = "immich-ml";
    platforms = lib.platforms.linux;
  };
}
