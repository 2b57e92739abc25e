# The container image for Nix users, the same image as deploy/Containerfile's (CPU) built from the Nix package:
#
#   nix build .#image && docker load < result      (or: podman load < result)
#
# Its environment, port, user, entrypoint and healthcheck are the Containerfile's (tests/deploy/test_nix_image.py
# compares them through nix/tests/image-config.nix); PATH and the CA bundle point into the Nix store instead.
{
  dockerTools,
  cacert,
  immich-ml,
}:

let
  uid = 10001; # deploy/Containerfile's immich-ml user and group
  seconds = n: n * 1000000000; # the image config counts healthcheck durations in nanoseconds
  # /etc/passwd and /etc/group with root (PID 1 starts as root), nobody and the daemon's user.
  users = dockerTools.fakeNss.override {
    extraPasswdLines = [ "immich-ml:x:${toString uid}:${toString uid}:immich-ml:/home/immich-ml:/noshell" ];
    extraGroupLines = [ "immich-ml:x:${toString uid}:" ];
  };
in
dockerTools.buildLayeredImage {
  name = "immich-ml";
  tag = immich-ml.version;
  contents = [
    immich-ml
    users
  ];
  # Owned as in the Containerfile: /cache and the home by the daemon's user, /tmp for everyone.
  fakeRootCommands = ''
    mkdir -p cache home/immich-ml tmp
    chown ${toString uid}:${toString uid} cache home/immich-ml
    chmod 1777 tmp
  '';
  config = {
    Entrypoint = [ "immich-ml-init" ];
    Cmd = [
      "immich-ml"
      "serve"
    ];
    Env = [
      "PATH=${immich-ml}/bin"
      "SSL_CERT_FILE=${cacert}/etc/ssl/certs/ca-bundle.crt"
      "IMMICH_HOST=0.0.0.0"
      "IMMICH_PORT=3003"
      "MACHINE_LEARNING_CACHE_FOLDER=/cache"
      "MACHINE_LEARNING_SHUTDOWN_TIMEOUT_S=8"
    ];
    ExposedPorts."3003/tcp" = { };
    Volumes."/cache" = { };
    Healthcheck = {
      Test = [
        "CMD"
        "immich-ml-healthcheck"
      ];
      Interval = seconds 30;
      Timeout = seconds 5;
      StartPeriod = seconds 60;
      Retries = 3;
    };
  };
}
