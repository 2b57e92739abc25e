# nix/image.nix evaluated with stand-ins for dockerTools, cacert and the package (nothing is built): the image's
# name, contents' names, fakeRootCommands and config as JSON, for tests/deploy/test_nix_image.py.
#   nix-instantiate --eval --strict --json nix/tests/image-config.nix
let
  stub = name: {
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };
  dockerTools = {
    buildLayeredImage = arguments: arguments;
    fakeNss = (stub "fake-nss") // {
      override = arguments: (stub "fake-nss") // { inherit (arguments) extraPasswdLines extraGroupLines; };
    };
  };
  image = import ../image.nix {
    inherit dockerTools;
    cacert = stub "nss-cacert";
    immich-ml = (stub "immich-ml-0.1.0") // {
      version = "0.1.0";
    };
  };
in
{
  inherit (image)
    name
    tag
    fakeRootCommands
    config
    ;
  contents = map (content: content.name) image.contents;
  users = { inherit (builtins.elemAt image.contents 1) extraPasswdLines extraGroupLines; };
}
