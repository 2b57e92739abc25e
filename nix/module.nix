# NixOS module for immich-ml: `services.immich-ml` (the daemon) and, from ./balancer.nix,
# `services.immich-ml.balancer` (nginx in front of several daemons).
#
# The package is the switch between CPU and GPU builds (`packages.<system>.cuda` from the flake);
# this module never rebuilds the package behind the user's back. `gpu.enable` only opens the
# NVIDIA devices, sets the provider and checks that the host and the package can do CUDA.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    mkOption
    mkEnableOption
    mkIf
    types
    ;

  cfg = config.services.immich-ml;
  gpu = cfg.gpu.enable;
  tensorrt = gpu && cfg.gpu.provider == "tensorrt";
  persistenced = config.hardware.nvidia.nvidiaPersistenced or false;
  datacenter = config.hardware.nvidia.datacenter.enable or false;
  nftables = config.networking.nftables.enable or false;
  immichServer = config.services.immich.enable or false;
  nixpkgsMachineLearning = immichServer && (config.services.immich.machine-learning.enable or false);
  # nixpkgs' own ML service listens on its IMMICH_PORT (3003 unless changed there).
  nixpkgsMachineLearningPort = config.services.immich.machine-learning.environment.IMMICH_PORT or "3003";

  endpoint = import ./endpoint.nix { inherit lib; };
  isLoopback = endpoint.isLoopback cfg.host;
  # systemd binds the socket: an address, never a name.
  listenStream =
    if cfg.host == "" then
      toString cfg.port
    else
      "${endpoint.bracketed (if cfg.host == "localhost" then "127.0.0.1" else cfg.host)}:${toString cfg.port}";
  serviceIPAddressDeny = lib.optionals cfg.restrictIPAddresses [ "any" ];
  serviceIPAddressAllow = lib.optionals cfg.restrictIPAddresses ([ "localhost" ] ++ cfg.allowedClients);
  localUrl = "http://${endpoint.dialHost cfg.host}:${toString cfg.port}";
  balancerUrl = "http://${endpoint.dialHost cfg.balancer.host}:${toString cfg.balancer.port}";

  credentialsDir = "/run/credentials/immich-ml.service";

  # The cache: systemd creates and owns it when it lives under /var/cache (CacheDirectory=, the
  # default) or /var/lib (StateDirectory=); anywhere else it is the administrator's location,
  # created by tmpfiles and made writable with ReadWritePaths=.
  cacheDir = lib.removeSuffix "/" (toString cfg.cacheDir);
  systemdDirectory =
    prefix: lib.hasPrefix prefix cacheDir && lib.removePrefix prefix cacheDir != "";
  cacheDirectoryConfig =
    if systemdDirectory "/var/cache/" then
      {
        CacheDirectory = lib.removePrefix "/var/cache/" cacheDir;
        CacheDirectoryMode = "0750";
      }
    else if systemdDirectory "/var/lib/" then
      {
        StateDirectory = lib.removePrefix "/var/lib/" cacheDir;
        StateDirectoryMode = "0750";
      }
    else
      { ReadWritePaths = [ cacheDir ]; };
  cacheManagedBySystemd = !(cacheDirectoryConfig ? ReadWritePaths);

  toEnvValue = v: if lib.isBool v then lib.boolToString v else toString v;
  commaList = lib.concatMapStringsSep "," toString;

  preloading = preloadEnv != { };
  preloadEnv = lib.filterAttrs (_: v: v != "") {
    MACHINE_LEARNING_PRELOAD__CLIP__VISUAL = lib.concatStringsSep "," cfg.preload.clip.visual;
    MACHINE_LEARNING_PRELOAD__CLIP__TEXTUAL = lib.concatStringsSep "," cfg.preload.clip.textual;
    MACHINE_LEARNING_PRELOAD__FACIAL_RECOGNITION__DETECTION = lib.concatStringsSep "," cfg.preload.facialRecognition.detection;
    MACHINE_LEARNING_PRELOAD__FACIAL_RECOGNITION__RECOGNITION = lib.concatStringsSep "," cfg.preload.facialRecognition.recognition;
    MACHINE_LEARNING_PRELOAD__OCR__DETECTION = lib.concatStringsSep "," cfg.preload.ocr.detection;
    MACHINE_LEARNING_PRELOAD__OCR__RECOGNITION = lib.concatStringsSep "," cfg.preload.ocr.recognition;
  };

  # Typed options first; `environment` last, so a key set there wins.
  unitEnvironment = {
    IMMICH_HOST = cfg.host;
    IMMICH_PORT = toString cfg.port;
    IMMICH_LOG_LEVEL = cfg.logLevel;
    NO_COLOR = "1"; # the journal does not render ANSI colours
    MACHINE_LEARNING_CACHE_FOLDER = cacheDir;
    MACHINE_LEARNING_MODEL_TTL = toString cfg.modelTTL;
    MACHINE_LEARNING_WORKERS = toString cfg.workers;
    MACHINE_LEARNING_PROVIDER = if gpu then cfg.gpu.provider else "cpu";
    MACHINE_LEARNING_PROVIDER_STRICT = lib.boolToString (gpu && cfg.gpu.strict);
    # Libraries that write caches under $HOME or ~/.cache: keep them in the writable cache dir.
    XDG_CACHE_HOME = cacheDir;
    HF_HOME = "${cacheDir}/huggingface";
  }
  // lib.optionalAttrs (cfg.threads.request != null) {
    MACHINE_LEARNING_REQUEST_THREADS = toString cfg.threads.request;
  }
  // lib.optionalAttrs (cfg.threads.interOp != null) {
    MACHINE_LEARNING_MODEL_INTER_OP_THREADS = toString cfg.threads.interOp;
  }
  // lib.optionalAttrs (cfg.threads.intraOp != null) {
    MACHINE_LEARNING_MODEL_INTRA_OP_THREADS = toString cfg.threads.intraOp;
  }
  // lib.optionalAttrs (cfg.allowedClients != [ ]) {
    # The daemon implies nothing; the module keeps loopback allowed so local checks
    # (immich-gpu-check, curl on the host, a balancer on this host) keep working.
    MACHINE_LEARNING_ALLOWED_CLIENTS = lib.concatStringsSep "," (
      cfg.allowedClients
      ++ [
        "127.0.0.0/8"
        "::1/128"
      ]
    );
  }
  // lib.optionalAttrs gpu {
    MACHINE_LEARNING_DEVICE_IDS = commaList cfg.gpu.deviceIds;
    # CUDA's PTX JIT cache; the default (~/.nv/ComputeCache) is read-only under ProtectSystem.
    CUDA_CACHE_PATH = "${cacheDir}/cuda";
  }
  // lib.optionalAttrs (gpu && cfg.gpu.memoryLimit != null) {
    MACHINE_LEARNING_GPU_MEM_LIMIT = toString cfg.gpu.memoryLimit;
  }
  // lib.optionalAttrs tensorrt {
    MACHINE_LEARNING_TENSORRT_CACHE_PATH = "${cacheDir}/tensorrt";
    MACHINE_LEARNING_TENSORRT_FP16 = lib.boolToString cfg.tensorrt.fp16;
  }
  // lib.optionalAttrs (cfg.tls.certFile != null) {
    MACHINE_LEARNING_TLS_CERT = "${credentialsDir}/tls-cert";
    MACHINE_LEARNING_TLS_KEY = "${credentialsDir}/tls-key";
  }
  // preloadEnv
  // lib.mapAttrs (_: toEnvValue) cfg.environment;

  # `openFirewall` with `allowedClients`: the port opens for those sources only, so other hosts'
  # packets are dropped by the kernel while the daemon's own outgoing traffic (model downloads)
  # is untouched. systemd's IPAddressDeny= cannot do that: it filters both directions.
  clientFirewall = cfg.openFirewall && cfg.allowedClients != [ ];
  clientsV6 = lib.filter (lib.hasInfix ":") cfg.allowedClients;
  clientsV4 = lib.filter (c: !lib.hasInfix ":" c) cfg.allowedClients;
  nftSet = clients: "{ ${lib.concatStringsSep ", " clients} }";
  nftablesRules = lib.concatStringsSep "\n" (
    lib.optional (clientsV4 != [ ]) "ip saddr ${nftSet clientsV4} tcp dport ${toString cfg.port} accept comment \"immich-ml\""
    ++ lib.optional (clientsV6 != [ ]) "ip6 saddr ${nftSet clientsV6} tcp dport ${toString cfg.port} accept comment \"immich-ml\""
  );
  iptablesRule =
    command: client:
    "${command} -A nixos-fw -p tcp -s ${client} --dport ${toString cfg.port} -j nixos-fw-accept -m comment --comment immich-ml";
  iptablesRules = lib.concatStringsSep "\n" (
    map (iptablesRule "iptables") clientsV4 ++ map (iptablesRule "ip6tables") clientsV6
  );

  modelList =
    description:
    mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "ViT-B-32__openai" ];
      description = "${description} models to load (and warm up) before the daemon reports ready.";
    };

  absolute = path: lib.hasPrefix "/" (toString path);
  daemonPorts = lib.optional cfg.enable cfg.port ++ lib.optional cfg.balancer.enable cfg.balancer.port;
in
{
  imports = [ ./balancer.nix ];

  options.services.immich-ml = {
    enable = mkEnableOption "immich-ml, a drop-in replacement for Immich's machine-learning service";

    package = lib.mkPackageOption pkgs "immich-ml" {
      extraDescription = ''
        The flake's module sets this to `packages.''${system}.default` (CPU). For an NVIDIA GPU use
        `packages.''${system}.cuda`: `gpu.enable` checks the package but never rebuilds it.
      '';
    };

    host = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = ''
        Address to listen on. Anything other than loopback exposes the service to the network:
        set `allowedClients` as well (the daemon has no authentication, and Immich sends it your photos).
      '';
    };

    port = mkOption {
      type = types.port;
      default = 3003;
      description = "TCP port to listen on (Immich's default machine-learning port is 3003).";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open `port` in the NixOS firewall: for everyone, or, when `allowedClients` is set, for those
        sources only (nftables or iptables rules, whichever firewall the host uses).
      '';
    };

    allowedClients = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "192.168.1.10/32"
        "fd00::/64"
      ];
      description = ''
        Addresses or CIDR networks allowed to connect. The daemon answers anyone else with 403
        (`MACHINE_LEARNING_ALLOWED_CLIENTS`), and with `openFirewall` the firewall lets only these
        sources reach `port`. Neither touches outgoing traffic, so model downloads keep working.
        Loopback is always allowed. Empty means everyone who can reach `host`.
      '';
    };

    restrictIPAddresses = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Also add `IPAddressDeny=any` plus `IPAddressAllow=localhost <allowedClients>` to the unit.
        systemd applies this filter to the unit's outgoing traffic too, so the daemon can no longer
        download models: only for hosts whose cache is filled beforehand (`immich-ml models pull`
        or `import`, run as `user` with `MACHINE_LEARNING_CACHE_FOLDER` set). `allowedClients` with
        `openFirewall` already drops other hosts' packets without this.
      '';
    };

    cacheDir = mkOption {
      type = types.path;
      default = "/var/cache/immich-ml";
      example = "/var/cache/immich";
      description = ''
        Model cache (upstream layout `<task>/<model>/<type>/model.onnx`), with the TensorRT engine
        cache in `tensorrt/` and CUDA's JIT cache in `cuda/` beneath it. Under `/var/cache` or
        `/var/lib`, systemd creates it (`CacheDirectory=` / `StateDirectory=`, mode 0750, owned by
        `user`); elsewhere tmpfiles creates it with the same mode and owner. `/var/cache/immich` is
        where nixpkgs' own Immich machine learning keeps the same layout, so pointing this there
        reuses its downloads.
      '';
    };

    user = mkOption {
      type = types.str;
      default = "immich";
      description = ''
        User the daemon runs as. The default `immich` is shared with nixpkgs' `services.immich` and
        created when absent; any other user must exist already.
      '';
    };

    group = mkOption {
      type = types.str;
      default = "immich";
      description = "Group the daemon runs as; `immich` is created when absent.";
    };

    logLevel = mkOption {
      type = types.enum [
        "debug"
        "info"
        "warning"
        "error"
      ];
      default = "info";
      description = "`IMMICH_LOG_LEVEL`.";
    };

    environment = mkOption {
      type = types.attrsOf (
        types.oneOf [
          types.str
          types.int
          types.bool
        ]
      );
      default = { };
      example = {
        MACHINE_LEARNING_MAX_BATCH_SIZE__FACIAL_RECOGNITION = 8;
        MACHINE_LEARNING_PING_REQUIRES_READY = true;
      };
      description = ''
        Extra environment for the daemon (`MACHINE_LEARNING_*`, `IMMICH_*`); booleans become
        `true`/`false`. A key set here wins over the value a typed option would give it.
      '';
    };

    secretsFile = mkOption {
      # A string, not types.path: a Nix path literal would copy the secrets into the world-readable store.
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/immich-ml.env";
      description = ''
        File of `NAME=value` lines read at every start (systemd `EnvironmentFile=`), for what must stay
        out of the Nix store: `HF_TOKEN` for gated or private Hugging Face repositories, a mirror's
        credentials in `HF_ENDPOINT`. An absolute path string outside the store (sops-nix, agenix or a
        file you manage); its values win over `environment`.
      '';
    };

    preload = {
      clip = {
        visual = modelList "CLIP image";
        textual = modelList "CLIP text (smart search)";
      };
      facialRecognition = {
        detection = modelList "Face detection";
        recognition = modelList "Face recognition";
      };
      ocr = {
        detection = modelList "OCR text detection";
        recognition = modelList "OCR text recognition";
      };
    };

    modelTTL = mkOption {
      type = types.ints.unsigned;
      default = 300;
      description = "Seconds a model may stay idle before it is unloaded (`MACHINE_LEARNING_MODEL_TTL`); 0 keeps models loaded.";
    };

    threads = {
      request = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "`MACHINE_LEARNING_REQUEST_THREADS` (pre- and post-processing); null: the usable CPUs (affinity and cgroup CPU quota, e.g. systemd's CPUQuota=).";
      };
      interOp = mkOption {
        type = types.nullOr types.ints.unsigned;
        default = null;
        description = "`MACHINE_LEARNING_MODEL_INTER_OP_THREADS`; null: ONNX Runtime's choice.";
      };
      intraOp = mkOption {
        type = types.nullOr types.ints.unsigned;
        default = null;
        description = "`MACHINE_LEARNING_MODEL_INTRA_OP_THREADS`; null: sized from the usable CPUs (docs/configuration.md, Threads and cores).";
      };
    };

    workers = mkOption {
      type = types.ints.positive;
      default = 1;
      description = "`MACHINE_LEARNING_WORKERS`. With several GPUs, one worker per entry in `gpu.deviceIds`.";
    };

    nice = mkOption {
      type = types.ints.between (-20) 19;
      default = if gpu then -10 else 0;
      defaultText = lib.literalExpression "if config.services.immich-ml.gpu.enable then -10 else 0";
      description = ''
        Scheduling priority (systemd `Nice=`). With a GPU a negative value keeps the thread that
        feeds the GPU from waiting behind Immich's own CPU-heavy jobs (thumbnails, transcoding).
      '';
    };

    watchdogSec = mkOption {
      type = types.ints.unsigned;
      default = 60;
      description = "systemd `WatchdogSec=` in seconds; the daemon pings from its event loop. 0 disables.";
    };

    startTimeout = mkOption {
      type = types.str;
      default = if tensorrt then "2h" else "30min";
      defaultText = lib.literalExpression ''if gpu.provider == "tensorrt" then "2h" else "30min"'';
      description = ''
        systemd `TimeoutStartSec=`: the daemon sends READY=1 only after preloaded models are
        downloaded and warmed up, and a first start with TensorRT builds engines for each model.
      '';
    };

    tls = {
      certFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/var/lib/acme/ml.example.org/cert.pem";
        description = "TLS certificate; passed with `LoadCredential=`, so it may be readable by root only.";
      };
      keyFile = mkOption {
        # A string, not types.path: a Nix path literal here would copy the key into the
        # world-readable store.
        type = types.nullOr types.str;
        default = null;
        example = "/var/lib/acme/ml.example.org/key.pem";
        description = ''
          TLS private key, as an absolute path string outside the Nix store (never a path
          literal, which would copy the key into the store); passed with `LoadCredential=`.
        '';
      };
    };

    gpu = {
      enable = mkEnableOption "inference on NVIDIA GPUs (needs a CUDA build of the package, e.g. the flake's `cuda`)";

      provider = mkOption {
        type = types.enum [
          "cuda"
          "tensorrt"
        ];
        default = "cuda";
        description = "ONNX Runtime execution provider. `tensorrt` needs an onnxruntime built with TensorRT.";
      };

      deviceIds = mkOption {
        type = types.listOf types.ints.unsigned;
        default = [ 0 ];
        example = [
          0
          1
        ];
        description = "CUDA device ordinals to use (`MACHINE_LEARNING_DEVICE_IDS`).";
      };

      memoryLimit = mkOption {
        type = types.nullOr (types.either types.ints.positive types.str);
        default = null;
        example = "4GiB";
        description = "Cap on the CUDA memory arena per device (`MACHINE_LEARNING_GPU_MEM_LIMIT`), bytes or with a suffix.";
      };

      strict = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Fail instead of silently falling back to the CPU when the GPU provider cannot start
          (`MACHINE_LEARNING_PROVIDER_STRICT`). The failure is then visible in `systemctl status`.
        '';
      };

      suppressDriverAssertion = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Skip the check that an NVIDIA driver is configured, for hosts whose driver NixOS does not
          manage (WSL: also add `/dev/dxg` to `systemd.services.immich-ml.serviceConfig.DeviceAllow`).
        '';
      };
    };

    tensorrt.fp16 = mkOption {
      type = types.bool;
      default = true;
      description = "Build TensorRT engines in FP16 (`MACHINE_LEARNING_TENSORRT_FP16`).";
    };

    hardening.memoryDenyWriteExecute = mkOption {
      type = types.bool;
      default = !tensorrt;
      defaultText = lib.literalExpression ''gpu.provider != "tensorrt"'';
      description = ''
        systemd `MemoryDenyWriteExecute=`. CPU and CUDA inference generate no host code at run time
        (CUDA's PTX JIT writes GPU code into device memory), so it stays on. It blocks loading any
        library marked as needing an executable stack: turn it off if the journal says
        `cannot enable executable stack as shared object requires: Operation not permitted`
        (onnxruntime's Python module before nixpkgs PR #482435, TensorRT's builder library).
      '';
    };

    immich = {
      enable = mkOption {
        type = types.bool;
        default = immichServer;
        defaultText = lib.literalExpression "config.services.immich.enable";
        description = ''
          Point nixpkgs' `services.immich` at this daemon (or at `balancer`, when that is on): its
          own machine-learning service is turned off, since it would listen on the same port, and
          `IMMICH_MACHINE_LEARNING_URL` is set to `immich.url`.
        '';
      };

      url = mkOption {
        type = types.str;
        default = if cfg.balancer.enable then balancerUrl else localUrl;
        defaultText = lib.literalExpression ''
          if balancer.enable then "http://''${balancer.host}:''${toString balancer.port}"
          else "http://''${host}:''${toString port}"'';
        example = "http://gpu-box.lan:3003";
        description = ''
          URL Immich uses for machine learning. For a list (remote first, this host as fallback) set
          `services.immich.settings.machineLearning.urls` instead, see docs/nixos.md.
        '';
      };
    };
  };

  config = lib.mkMerge [
    (mkIf (cfg.enable || cfg.balancer.enable) {
      assertions = [
        {
          assertion = cfg.immich.enable -> immichServer;
          message = "services.immich-ml.immich.enable configures nixpkgs' Immich, but services.immich.enable is false.";
        }
        {
          assertion = !(nixpkgsMachineLearning && lib.elem nixpkgsMachineLearningPort (map toString daemonPorts));
          message = ''
            nixpkgs' Immich runs its own machine learning (services.immich.machine-learning.enable) on
            port ${nixpkgsMachineLearningPort}, which immich-ml uses too. Let immich-ml replace it:
              services.immich-ml.immich.enable = true;   (the default with services.immich.enable)
            or turn it off yourself: services.immich.machine-learning.enable = false;
            or move immich-ml to another port: services.immich-ml.port.
          '';
        }
      ];

      services.immich = mkIf cfg.immich.enable {
        machine-learning.enable = false;
        # nixpkgs sets this at normal priority to http://localhost:3003.
        environment.IMMICH_MACHINE_LEARNING_URL = lib.mkForce cfg.immich.url;
      };
    })

    (mkIf cfg.enable {
      assertions = [
        {
          assertion = lib.all (f: f == null || absolute f) [
            cfg.tls.certFile
            cfg.tls.keyFile
          ];
          message = "services.immich-ml.tls.certFile and tls.keyFile must be absolute paths.";
        }
        {
          assertion = cfg.tls.keyFile == null || !lib.hasPrefix builtins.storeDir cfg.tls.keyFile;
          message = ''
            services.immich-ml.tls.keyFile is in the Nix store, which every user can read. Keep the key
            outside it (for example /var/lib/acme/… or /run/keys/…) and give its path as a string.
          '';
        }
        {
          assertion =
            cfg.secretsFile == null
            || (absolute cfg.secretsFile && !lib.hasPrefix builtins.storeDir cfg.secretsFile);
          message = ''
            services.immich-ml.secretsFile must be an absolute path outside the Nix store, given as a
            string (for example "/run/secrets/immich-ml.env"), so that the secrets never reach the store.
          '';
        }
        {
          assertion = (cfg.tls.certFile == null) == (cfg.tls.keyFile == null);
          message = "services.immich-ml.tls: set both certFile and keyFile, or neither.";
        }
        {
          assertion =
            gpu
            -> (
              (config.hardware.nvidia.enabled or false)
              || datacenter
              || lib.elem "nvidia" (config.services.xserver.videoDrivers or [ ])
              || cfg.gpu.suppressDriverAssertion
            );
          message = ''
            services.immich-ml.gpu.enable needs the NVIDIA driver. Set one of:
              services.xserver.videoDrivers = [ "nvidia" ];   (also right on headless hosts)
              hardware.nvidia.datacenter.enable = true;       (data-centre GPUs)
              services.immich-ml.gpu.suppressDriverAssertion = true;  (WSL, or a driver NixOS does not manage)
          '';
        }
        {
          assertion =
            (gpu && !datacenter && !cfg.gpu.suppressDriverAssertion)
            -> (config.hardware.graphics.enable or (config.hardware.opengl.enable or false));
          message = ''
            services.immich-ml.gpu.enable: CUDA finds libcuda.so through /run/opengl-driver/lib, which
            only exists with `hardware.graphics.enable = true;` (on NixOS before 24.11:
            `hardware.opengl.enable = true;`). Data-centre drivers (hardware.nvidia.datacenter.enable)
            do not need it.
          '';
        }
        {
          assertion = gpu -> (cfg.package.passthru.cudaSupport or false);
          message = ''
            services.immich-ml.gpu.enable is set but services.immich-ml.package (${cfg.package.name or "?"})
            was not built with CUDA, so every model would run on the CPU. Build it from this system's own
            nixpkgs, for your GPU's architecture only (see docs/nixos.md, "NVIDIA GPUs"):
              nixpkgs.overlays = [ inputs.immich-ml.overlays.default ];
              nixpkgs.config.cudaCapabilities = [ "8.6" ];  # nvidia-smi --query-gpu=compute_cap --format=csv
              nixpkgs.config.allowUnfreePredicate = inputs.immich-ml.lib.isCudaLibrary;
              services.immich-ml.package = pkgs.immich-ml-cuda;
            A package of your own must set passthru.cudaSupport = true.
          '';
        }
        {
          assertion = tensorrt -> (cfg.package.passthru.tensorrtSupport or false);
          message = ''
            services.immich-ml.gpu.provider = "tensorrt" needs an onnxruntime built with the TensorRT
            execution provider, and services.immich-ml.package does not have one (nixpkgs' onnxruntime
            builds CUDA only). Use gpu.provider = "cuda", or a package with passthru.tensorrtSupport = true.
          '';
        }
        {
          assertion = gpu -> cfg.gpu.deviceIds != [ ];
          message = "services.immich-ml.gpu.deviceIds must name at least one device.";
        }
      ];

      warnings =
        lib.optional (!isLoopback && cfg.allowedClients == [ ]) ''
          services.immich-ml.host = "${cfg.host}" accepts connections from the network, and
          services.immich-ml.allowedClients is empty: anyone who can reach port ${toString cfg.port} can
          use the service, and it has no authentication. List your Immich server's address in
          services.immich-ml.allowedClients.
        ''
        ++ lib.optional (cfg.openFirewall && isLoopback) ''
          services.immich-ml.openFirewall opens port ${toString cfg.port}, but host = "${cfg.host}" only
          listens on loopback, so nothing outside can connect anyway.
        '';

      users.users = mkIf (cfg.user == "immich") {
        immich = {
          isSystemUser = true;
          # nixpkgs' services.immich defines this user too, with its own group: a default here,
          # so a different services.immich-ml.group is not an evaluation conflict (the unit's
          # Group= decides what the daemon runs as).
          group = lib.mkDefault cfg.group;
        };
      };
      users.groups = mkIf (cfg.group == "immich") { immich = { }; };

      systemd.tmpfiles.rules = lib.optional (!cacheManagedBySystemd) "d ${cacheDir} 0750 ${cfg.user} ${cfg.group} - -";

      # No boot.kernelModules: CUDA needs /dev/nvidia-uvm, and nixpkgs' NVIDIA module loads
      # nvidia_uvm itself (explicitly with the open kernel module; the proprietary one pulls it in
      # through its modprobe softdep, as nixpkgs' comment there says) and its udev rules create the
      # node. Where NixOS does not manage the driver (WSL, gpu.suppressDriverAssertion) there is no
      # such kernel module at all. immich-gpu-check reports a missing one with the fix.

      networking.firewall = {
        allowedTCPPorts = mkIf (cfg.openFirewall && !clientFirewall) [ cfg.port ];
        extraInputRules = mkIf (clientFirewall && nftables) nftablesRules;
        extraCommands = mkIf (clientFirewall && !nftables) iptablesRules;
      };

      # `immich-ml models …` and `immich-gpu-check` for the administrator.
      environment.systemPackages = [ cfg.package ];

      # The listening socket outlives the service: while the service restarts (a new package or
      # settings on `nixos-rebuild switch`, a watchdog kill) connections wait in its backlog, so a
      # restart fails no Immich job. Its unit changes only with host and port, so a switch restarts
      # it (closing the listener) only then. Stopping the service alone is undone by the next
      # connection: `systemctl stop immich-ml.socket immich-ml.service`.
      systemd.sockets.immich-ml = {
        description = "Immich machine learning (immich-ml) listening socket";
        wantedBy = [ "sockets.target" ];
        listenStreams = [ listenStream ];
        socketConfig = {
          Backlog = 128; # the daemon listens with the same backlog
          FreeBind = true; # a specific address may come up after sockets.target
          IPAddressDeny = serviceIPAddressDeny;
          IPAddressAllow = serviceIPAddressAllow;
        };
      };

      systemd.services.immich-ml = {
        description = "Immich machine learning (immich-ml)";
        wantedBy = [ "multi-user.target" ];
        requires = [ "immich-ml.socket" ]; # ordered after it by systemd (the socket activates the service)
        # A changed service is restarted, its socket kept (the default, stop-then-start, would stop
        # the socket too and start it again, closing the listener).
        stopIfChanged = false;
        # Preloaded models may have to be downloaded before READY=1: wait for the network to be up
        # (network.target only orders against its configuration). CUDA needs the driver's kernel
        # modules (systemd-modules-load) and, where enabled, nvidia-persistenced; nothing from the
        # container toolkit, whose CDI generator waits on `udevadm settle` for up to 3 minutes.
        after = [
          "network.target"
        ]
        ++ lib.optional preloading "network-online.target"
        ++ lib.optional gpu "systemd-modules-load.service"
        ++ lib.optional (gpu && persistenced) "nvidia-persistenced.service";
        wants = lib.optional preloading "network-online.target";
        environment = unitEnvironment;

        serviceConfig = cacheDirectoryConfig // {
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = "${lib.getExe' cfg.package "immich-ml"} serve";
          Restart = "on-failure";
          RestartSec = 5;
          TimeoutStartSec = cfg.startTimeout;
          # The daemon's whole stop (finish the requests in flight, close) takes at most
          # MACHINE_LEARNING_SHUTDOWN_TIMEOUT_S (30 s by default) after SIGTERM.
          TimeoutStopSec = 45;
          WatchdogSec = cfg.watchdogSec;
          User = cfg.user;
          Group = cfg.group;
          WorkingDirectory = cacheDir;
          UMask = "0027"; # models stay readable by the group, as the 0750 cache dir promises
          Nice = cfg.nice;
          # One descriptor per client connection (Immich, or a balancer's keep-alive pool) plus
          # model downloads; systemd's soft default of 1024 is tight behind a busy balancer.
          LimitNOFILE = 65536;
          EnvironmentFile = lib.optional (cfg.secretsFile != null) cfg.secretsFile;
          LoadCredential = lib.optionals (cfg.tls.certFile != null) [
            "tls-cert:${cfg.tls.certFile}"
            "tls-key:${cfg.tls.keyFile}"
          ];

          IPAddressDeny = serviceIPAddressDeny;
          IPAddressAllow = serviceIPAddressAllow;

          CapabilityBoundingSet = [ "" ];
          NoNewPrivileges = true;
          LockPersonality = true;
          # Decision and evidence: see the option's description and docs/nixos.md ("Hardening").
          MemoryDenyWriteExecute = cfg.hardening.memoryDenyWriteExecute;
          PrivateTmp = true;
          PrivateMounts = true;
          # PrivateUsers maps supplementary groups to nobody, which would void video/render below.
          PrivateUsers = !gpu;
          # PrivateDevices hides /dev/nvidia*; with the GPU, devices are allowed by class instead.
          PrivateDevices = !gpu;
          DevicePolicy = "closed";
          DeviceAllow = lib.optionals gpu [
            # Major-number classes from /proc/devices also cover nodes created after start.
            "char-nvidiactl" # /dev/nvidiactl, /dev/nvidia0..N
            "char-nvidia-frontend" # the per-GPU nodes on newer drivers
            "char-nvidia-uvm" # /dev/nvidia-uvm, /dev/nvidia-uvm-tools: CUDA memory
            "char-nvidia-caps" # /dev/nvidia-caps/*: MIG
          ];
          SupplementaryGroups = lib.optionals gpu [
            "video"
            "render"
          ];
          LimitMEMLOCK = mkIf gpu "infinity"; # pinned host buffers for H2D copies
          ProtectSystem = "strict";
          ProtectHome = true;
          ProtectProc = "invisible";
          ProcSubset = "all"; # onnxruntime reads /proc/cpuinfo and /proc/meminfo
          ProtectClock = true;
          ProtectControlGroups = true;
          ProtectHostname = true;
          ProtectKernelLogs = true;
          ProtectKernelModules = true;
          ProtectKernelTunables = true;
          RemoveIPC = true;
          RestrictAddressFamilies = [
            "AF_INET"
            "AF_INET6"
            "AF_UNIX"
          ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          SystemCallArchitectures = "native";
          # @system-service includes @ipc (memfd_create, which the CUDA driver needs at init);
          # @resources stays allowed for NUMA/affinity calls (mbind, sched_setaffinity).
          SystemCallFilter = [
            "@system-service @resources"
            "~@privileged"
          ];
          SystemCallErrorNumber = "EPERM";
        };
      };
    })
  ];

  meta.maintainers = (import ./meta.nix).maintainers;
}
