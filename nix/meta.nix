# Who maintains immich-ml and where it is published, in nixpkgs' `meta` vocabulary: read by the
# package (meta.homepage, meta.maintainers) and the NixOS module (meta.maintainers).
# OWNER/immich-ml stands for the published repository, as in docs/nixos.md; change it here only.
{
  homepage = "https://github.com/OWNER/immich-ml";
  # The repository's committer identity (git log), in lib.maintainers' format.
  maintainers = [
    {
      name = "immich-ml maintainers";
      email = "maintainers@users.noreply.b-seed-f0479dfc.example";
    }
  ];
}
