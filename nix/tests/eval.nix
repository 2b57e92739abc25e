# Evaluation tests for nix/module.nix against the nixpkgs library alone (no nixpkgs, no NixOS).
#
# The few NixOS options the module reads or sets are declared here as stubs, and `pkgs` holds
# fake packages, so this runs with nothing but `lib`:
#
#   nix-instantiate --eval --strict nix/tests/eval.nix --arg lib 'import /path/to/nixpkgs.lib/lib'
#
# (nix/eval-test.sh does that.) It evaluates to a summary string when every check passes and
# throws a list of the failed checks otherwise. The flake runs the same file as a check.
{ lib }:

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
          };
        }
      )) { };
      hardware.nvidia.enabled = option types.bool false;
      hardware.nvidia.datacenter.enable = option types.bool false;
      hardware.graphics.enable = option types.bool false;
      hardware.nvidia-container-toolkit.enable = option types.bool false;
      services.xserver.videoDrivers = option (types.listOf types.str) [ ];
      services.immich.enable = option types.bool false;
      services.immich.machine-learning.enable = option types.bool true;
      services.immich.environment = option (types.attrsOf types.str) { };
    };
    # What nixpkgs' immich module does to its environment (normal priority).
    config.services.immich.environment.IMMICH_MACHINE_LEARNING_URL = "http://localhost:3003";
  };

  eval =
    userConfig:
    (lib.evalModules {
      specialArgs = { inherit pkgs; };
      modules = [
        nixosStubs
        ../module.nix
        { services.immich-ml.enable = true; }
        userConfig
      ];
    }).config;

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
  remote = eval {
    services.immich-ml.host = "0.0.0.0";
    services.immich-ml.openFirewall = true;
    services.immich-ml.allowedClients = [ "192.168.1.10/32" ];
  };
  exposed = eval { services.immich-ml.host = "0.0.0.0"; };

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
    cpuPrivateDevices = (sc cpu).PrivateDevices && (sc cpu).DeviceAllow == [ ];
    cpuPrivateUsers = (sc cpu).PrivateUsers;
    cpuNoMemlock = !((sc cpu) ? LimitMEMLOCK);
    cpuNice = (sc cpu).Nice == 0;
    cpuProtectSystem = (sc cpu).ProtectSystem == "strict";
    cpuMDWE = (sc cpu).MemoryDenyWriteExecute;
    cpuSyscalls = lib.elem "~@privileged" (sc cpu).SystemCallFilter;
    cpuCapabilities = (sc cpu).CapabilityBoundingSet == [ "" ];
    cpuReadWrite = (sc cpu).ReadWritePaths == [ "/var/lib/immich/.cache" ];
    cpuNoIPFilter = (sc cpu).IPAddressDeny == [ ] && (sc cpu).IPAddressAllow == [ ];
    cpuEnv =
      (env cpu).IMMICH_HOST == "127.0.0.1"
      && (env cpu).IMMICH_PORT == "3003"
      && (env cpu).MACHINE_LEARNING_CACHE_FOLDER == "/var/lib/immich/.cache"
      && (env cpu).MACHINE_LEARNING_PROVIDER == "cpu"
      && !((env cpu) ? MACHINE_LEARNING_ALLOWED_CLIENTS);
    cpuNoKernelModules = cpu.boot.kernelModules == [ ];
    cpuCacheDir = lib.elem "d /var/lib/immich/.cache 0750 immich immich - -" cpu.systemd.tmpfiles.rules;
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
    gpuUvm = gpuCfg.boot.kernelModules == [ "nvidia_uvm" ];
    gpuMDWE = (sc gpuCfg).MemoryDenyWriteExecute;
    gpuEnv =
      (env gpuCfg).MACHINE_LEARNING_PROVIDER == "cuda"
      && (env gpuCfg).MACHINE_LEARNING_PROVIDER_STRICT == "true"
      && (env gpuCfg).MACHINE_LEARNING_DEVICE_IDS == "0"
      && (env gpuCfg).CUDA_CACHE_PATH == "/var/lib/immich/.cache/cuda";
    gpuNoToolkitOrdering = (unit gpuCfg).after == [ "network.target" ] && (unit gpuCfg).wants == [ ];
    gpuToolkitOrdering =
      lib.elem "nvidia-container-toolkit-cdi-generator.service" (unit gpuToolkit).after
      && lib.elem "nvidia-container-toolkit-cdi-generator.service" (unit gpuToolkit).wants
      && (unit gpuToolkit).requires == [ ];
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
      (env trt).MACHINE_LEARNING_TENSORRT_CACHE_PATH == "/var/lib/immich/.cache/tensorrt"
      && (env trt).MACHINE_LEARNING_TENSORRT_FP16 == "true"
      && lib.elem "d /var/lib/immich/.cache/tensorrt 0750 immich immich - -" trt.systemd.tmpfiles.rules;

    # Remote host with an allowlist.
    remoteNoWarnings = remote.warnings == [ ];
    remoteFirewall = remote.networking.firewall.allowedTCPPorts == [ 3003 ];
    remoteIPFilter =
      (sc remote).IPAddressDeny == [ "any" ]
      && (sc remote).IPAddressAllow == [
        "localhost"
        "192.168.1.10/32"
      ];
    remoteAppAllowlist = (env remote).MACHINE_LEARNING_ALLOWED_CLIENTS == "192.168.1.10/32,127.0.0.0/8,::1/128";
    remoteIPFilterCanBeOff =
      (sc (eval {
        imports = [ { services.immich-ml.allowedClients = [ "10.0.0.0/8" ]; } ];
        services.immich-ml.restrictIPAddresses = false;
      })).IPAddressDeny == [ ];

    # Warnings.
    warnsWhenExposed = lib.any (w: lib.hasInfix "allowedClients is empty" w) exposed.warnings;
    warnsUselessFirewall =
      lib.any (w: lib.hasInfix "only\nlistens on loopback" w)
        (eval { services.immich-ml.openFirewall = true; }).warnings;

    # Typed options and freeform settings.
    settingsWin =
      let
        c = eval {
          services.immich-ml.modelTTL = 600;
          services.immich-ml.settings = {
            MACHINE_LEARNING_MODEL_TTL = 0;
            MACHINE_LEARNING_PING_REQUIRES_READY = true;
          };
        };
      in
      (env c).MACHINE_LEARNING_MODEL_TTL == "0" && (env c).MACHINE_LEARNING_PING_REQUIRES_READY == "true";
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

    # Each assertion fires, with a message that names the fix.
    assertRelativeCacheDir = hasFailed "cacheDir must be an absolute path" (eval {
      services.immich-ml.cacheDir = "models";
    });
    assertRelativeTls = hasFailed "must be absolute paths" (eval {
      services.immich-ml.tls = {
        certFile = "cert.pem";
        keyFile = "/k";
      };
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
in
if failed == [ ] then
  "immich-ml module: all ${toString (lib.length (lib.attrNames checks))} evaluation checks passed"
else
  throw "immich-ml module: failed checks: ${lib.concatStringsSep ", " failed}"
