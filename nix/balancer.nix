# `services.immich-ml.balancer`: nginx in front of several immich-ml daemons (this host's and
# others'). Immich treats several machine-learning URLs as a failover list, not a pool; behind
# this one URL every backend takes a share. The daemon is built for it: POST /predict has no side
# effects, so a request that a backend refuses with 503 (draining, overloaded), drops or never
# answers is sent to the next backend. docs/scaling.md explains the choices below.
{ config, lib, ... }:

let
  inherit (lib) mkOption types;

  cfg = config.services.immich-ml;
  balancer = cfg.balancer;
  endpoint = import ./endpoint.nix { inherit lib; };

  backendDefaults = {
    weight = 1;
    backup = false;
    maxFails = 3;
    failTimeout = "10s";
  };

  backendModule = {
    options = {
      address = mkOption {
        type = types.str;
        example = "192.168.1.20:3003";
        description = ''
          `host:port` of an immich-ml daemon: an IP address (IPv6 in brackets), or a name that
          resolves when nginx starts (nginx resolves upstream names once, at start).
        '';
      };
      weight = mkOption {
        type = types.ints.positive;
        default = backendDefaults.weight;
        description = "Relative share of requests (nginx `weight=`), e.g. 3 for a GPU next to CPU backends.";
      };
      backup = mkOption {
        type = types.bool;
        default = backendDefaults.backup;
        description = "Send requests here only while every other backend is down (nginx `backup`).";
      };
      maxFails = mkOption {
        type = types.ints.unsigned;
        default = backendDefaults.maxFails;
        description = ''
          Passive health check (nginx `max_fails=`): after this many failed attempts (connection
          errors, timeouts, 503) within `failTimeout`, the backend gets no requests for `failTimeout`.
          0 never takes it out.
        '';
      };
      failTimeout = mkOption {
        type = types.str;
        default = backendDefaults.failTimeout;
        description = "nginx `fail_timeout=`: the window for `maxFails` and how long a failed backend rests.";
      };
    };
  };

  localAddress = "${endpoint.dialHost cfg.host}:${toString cfg.port}";
  servers =
    lib.optional balancer.includeLocal (backendDefaults // { address = localAddress; }) ++ balancer.backends;
  serverParameters = backend: {
    inherit (backend) weight backup;
    max_fails = backend.maxFails;
    fail_timeout = backend.failTimeout;
  };
  addresses = map (backend: backend.address) servers;

  upstream = "immich-ml";
  # Loopback stays allowed for checks on this host, as for the daemon's own allowlist.
  accessRules = lib.optionalString (balancer.allowedClients != [ ]) (
    lib.concatMapStrings (client: "allow ${client};\n") (
      balancer.allowedClients
      ++ [
        "127.0.0.0/8"
        "::1"
      ]
    )
    + "deny all;\n"
  );
in
{
  options.services.immich-ml.balancer = {
    enable = lib.mkEnableOption ''
      an nginx load balancer in front of several immich-ml daemons (`backends`, plus this host's own
      with `includeLocal`); with `services.immich-ml.immich.enable`, Immich is pointed at it'';

    host = mkOption {
      type = types.str;
      default = "127.0.0.1";
      description = "Address nginx listens on for Immich (loopback: Immich runs on this host).";
    };

    port = mkOption {
      type = types.port;
      default = 3003;
      description = ''
        Port nginx listens on: where Immich's machine-learning URL points (3003 is Immich's default).
        A daemon on this host then needs another `services.immich-ml.port`, e.g. 3004.
      '';
    };

    backends = mkOption {
      type = types.listOf (types.coercedTo types.str (address: { inherit address; }) (types.submodule backendModule));
      default = [ ];
      example = lib.literalExpression ''
        [
          "192.168.1.20:3003"
          { address = "192.168.1.21:3003"; weight = 2; }
        ]
      '';
      description = ''
        immich-ml daemons on other hosts, as `host:port` or with options. Their `allowedClients`
        must list this host, which is where the requests now come from.
      '';
    };

    includeLocal = mkOption {
      type = types.bool;
      default = cfg.enable;
      defaultText = lib.literalExpression "config.services.immich-ml.enable";
      description = "Add this host's daemon (`services.immich-ml.host`:`port`) to the backends, with the default weight.";
    };

    allowedClients = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "192.168.1.10" ];
      description = ''
        Addresses or CIDR networks nginx accepts requests from (`allow`/`deny`, 403 for others);
        loopback is always allowed. Empty means everyone who can reach `host`.
      '';
    };

    tries = mkOption {
      type = types.ints.unsigned;
      default = 0;
      description = ''
        nginx `proxy_next_upstream_tries`: attempts per request, the first included. 0 (nginx's
        default) tries each backend at most once.
      '';
    };

    connectTimeout = mkOption {
      type = types.str;
      default = "2s";
      description = ''
        nginx `proxy_connect_timeout`: how long a backend that is switched off (no answer at all) holds
        a request before it goes to the next one.
      '';
    };

    readTimeout = mkOption {
      type = types.str;
      default = "10m";
      description = ''
        nginx `proxy_read_timeout`/`proxy_send_timeout`. Long, because a backend's first request for
        a model waits for its download; a backend that hangs is restarted by its watchdog sooner,
        and nginx then retries elsewhere.
      '';
    };

    keepalive = mkOption {
      type = types.ints.positive;
      default = 16;
      description = "Idle keep-alive connections nginx keeps to the backends, per worker process.";
    };
  };

  config = lib.mkIf balancer.enable {
    assertions = [
      {
        assertion = servers != [ ];
        message = ''
          services.immich-ml.balancer has no backends: list them in services.immich-ml.balancer.backends,
          or enable services.immich-ml on this host (balancer.includeLocal adds it).
        '';
      }
      {
        assertion = lib.length (lib.unique addresses) == lib.length addresses;
        message = "services.immich-ml.balancer lists a backend twice: ${lib.concatStringsSep ", " addresses}.";
      }
      {
        assertion =
          !(cfg.enable && balancer.port == cfg.port && endpoint.overlap balancer.host cfg.host);
        message = ''
          services.immich-ml.balancer.port and services.immich-ml.port are both ${toString cfg.port}:
          nginx listens where Immich's URL points, so move this host's daemon, e.g.
            services.immich-ml.port = 3004;
        '';
      }
    ];

    warnings = lib.optional (!endpoint.isLoopback balancer.host && balancer.allowedClients == [ ]) ''
      services.immich-ml.balancer.host = "${balancer.host}" accepts connections from the network, and
      services.immich-ml.balancer.allowedClients is empty: anyone who can reach port
      ${toString balancer.port} can use every backend. List your Immich server's address there.
    '';

    services.nginx = {
      enable = true;
      upstreams.${upstream} = {
        servers = lib.listToAttrs (map (backend: lib.nameValuePair backend.address (serverParameters backend)) servers);
        # least_conn: requests differ a lot in cost (a face-detection image vs a search query),
        # so the backend with the fewest requests in flight is a better pick than the next in turn.
        # keepalive_timeout stays below the daemon's own 10 s (MACHINE_LEARNING_HTTP_KEEPALIVE_TIMEOUT_S),
        # so nginx never reuses a connection the daemon is just closing.
        extraConfig = ''
          least_conn;
          keepalive ${toString balancer.keepalive};
          keepalive_timeout 5s;
        '';
      };
      virtualHosts.immich-ml = {
        listen = [
          {
            addr = endpoint.bracketed balancer.host;
            inherit (balancer) port;
          }
        ];
        locations."/" = {
          proxyPass = "http://${upstream}";
          extraConfig = ''
            ${accessRules}
            # Keep-alive to the backends: HTTP/1.1, and no "Connection: close" passed on.
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # POST /predict has no side effects, so it may go to the next backend (nginx retries
            # a POST only with non_idempotent); 503 is what a draining or overloaded daemon answers.
            proxy_next_upstream error timeout http_503 non_idempotent;
            proxy_next_upstream_tries ${toString balancer.tries};
            proxy_connect_timeout ${balancer.connectTimeout};
            proxy_send_timeout ${balancer.readTimeout};
            proxy_read_timeout ${balancer.readTimeout};
            # The whole body is read before the first attempt, which is what lets nginx send it
            # again (nginx's default, stated because the retries depend on it).
            proxy_request_buffering on;
            client_body_buffer_size 1m;
            # The daemon's default limit (MACHINE_LEARNING_MAX_BODY_SIZE, 128 MiB).
            client_max_body_size 128m;
          '';
        };
      };
    };
  };
}
