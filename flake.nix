{
  description = "immich-ml: drop-in machine-learning backend for Immich (ONNX Runtime, dynamic batching, systemd-native)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  # This flake only wires: the package, module and tests live in nix/.
  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      # The CUDA build is offered where nixpkgs' CUDA onnxruntime is routinely built.
      cudaSystems = [ "x86_64-linux" ];

      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      # `packages.cuda` comes from a second nixpkgs instance that allows the CUDA toolkit's own unfree
      # licences and nothing else, for every GPU architecture nixpkgs builds by default: hours of
      # compiling (no binary cache for unfree packages) and a second glibc and Python beside the
      # system's. A NixOS host should build from its own nixpkgs instead, for its GPU only: the
      # overlay's immich-ml-cuda with nixpkgs.config.cudaCapabilities (docs/nixos.md).
      cudaPrefixes = [
        "cuda_"
        "cuda-"
        "cudatoolkit"
        "cudnn"
        "libcu"
        "libnv"
        "libnpp"
        "nccl"
      ];
      isCudaLibrary = pkg: lib.any (prefix: lib.hasPrefix prefix (lib.getName pkg)) cudaPrefixes;
      pkgsWithCudaLibraries =
        system:
        import nixpkgs {
          inherit system;
          config.allowUnfreePredicate = isCudaLibrary;
        };
    in
    {
      # For nixpkgs.config.allowUnfreePredicate: the CUDA libraries' licences, nothing else.
      lib = { inherit isCudaLibrary; };

      overlays.default = final: _prev: {
        immich-ml = final.callPackage ./nix/package.nix { };
        immich-ml-cuda = final.callPackage ./nix/package.nix { cudaSupport = true; };
        # Needs a nixpkgs whose onnxruntime builds TensorRT (see nix/package.nix).
        immich-ml-tensorrt = final.callPackage ./nix/package.nix {
          cudaSupport = true;
          tensorrtSupport = true;
        };
      };

      # The package defaults to a build against the host's own nixpkgs (no second nixpkgs in
      # the closure), CUDA when that nixpkgs has config.cudaSupport. Otherwise, for a GPU set
      # services.immich-ml.package, see docs/nixos.md.
      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nix/module.nix ];
          services.immich-ml.package = lib.mkDefault (pkgs.callPackage ./nix/package.nix { });
        };

      packages = forAllSystems (
        system: pkgs:
        {
          # `nix build .#default.tests.vm-cpu` runs the NixOS VM test against this package.
          default = (pkgs.callPackage ./nix/package.nix { }).overrideAttrs (previous: {
            passthru = previous.passthru // {
              tests.vm-cpu = self.checks.${system}.vm-cpu;
            };
          });
          # The CPU container image (docs/docker.md): nix build .#image && docker load < result
          image = pkgs.callPackage ./nix/image.nix { immich-ml = self.packages.${system}.default; };
        }
        // lib.optionalAttrs (lib.elem system cudaSystems) {
          cuda = (pkgsWithCudaLibraries system).callPackage ./nix/package.nix { cudaSupport = true; };
        }
      );

      # `nix run github:…/immich-ml` serves on 127.0.0.1:3003 with models in
      # ${XDG_CACHE_HOME:-~/.cache}/immich_ml; extra arguments go to `immich-ml serve`.
      apps = forAllSystems (
        system: pkgs: {
          default = {
            type = "app";
            program = lib.getExe (
              pkgs.writeShellApplication {
                name = "immich-ml-serve";
                text = ''exec ${lib.getExe self.packages.${system}.default} serve "$@"'';
              }
            );
            meta.description = "Run the immich-ml daemon in the foreground";
          };
        }
      );

      # CPU only: the CUDA package takes hours to build and cannot be tested without a GPU.
      checks = forAllSystems (
        system: pkgs: {
          package = self.packages.${system}.default; # builds and runs the pytest suite
          module-eval = pkgs.writeText "immich-ml-module-eval" (import ./nix/tests/eval.nix { inherit lib; });
          vm-cpu = import ./nix/tests/vm.nix { inherit self pkgs; };
        }
      );

      devShells = forAllSystems (
        system: pkgs: {
          default = pkgs.mkShell {
            packages = self.packages.${system}.default.passthru.developmentPackages ++ [
              pkgs.mypy
              pkgs.nixfmt
              pkgs.ruff
            ];
          };
        }
      );

      formatter = forAllSystems (_system: pkgs: pkgs.nixfmt);
    };
}
