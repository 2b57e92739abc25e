# The phases nixpkgs' buildPythonApplication runs for nix/package.nix, as simulate.py runs them: as a
# non-root user, in a network namespace of its own, with the environment simulate.py sets (`env -i`).
# Arguments: pytest's arguments, as pytestCheckHook computes them. Inputs in the environment:
#   out, NIX_BUILD_TOP, pythonVersion, postPatch, preCheck, postCheck, pythonImportsCheck (space
#   separated), doCheck (1 or empty), pythonRelaxDeps (`*` or the names whose bounds are dropped),
#   buildsimTools (build, installer).
set -euo pipefail

phase() { echo "buildsim: == $1"; }

# stdenv's substituteInPlace, for postPatch: --replace-fail / --replace-warn / --replace-quiet A B.
substituteInPlace() {
  local file=$1 content mode from to
  shift
  content=$(<"$file")
  while (($#)); do
    mode=$1 from=$2 to=$3
    shift 3
    if [[ $content != *"$from"* ]]; then
      case $mode in
        --replace-fail) echo "substituteInPlace: '$from' not found in $file" >&2; return 1 ;;
        --replace-warn) echo "substituteInPlace: warning: '$from' not found in $file" >&2 ;;
        --replace-quiet) ;;
        *) echo "substituteInPlace: unsupported option $mode" >&2; return 1 ;;
      esac
    fi
    content=${content//"$from"/"$to"}
  done
  printf '%s\n' "$content" >"$file"
}

sitePackages="lib/python$pythonVersion/site-packages"
cd "$NIX_BUILD_TOP/source"

phase "patchPhase (postPatch)"
eval "$postPatch"

phase "buildPhase (pypaBuildHook: python -m build --no-isolation --wheel)"
PYTHONPATH="$buildsimTools:$PYTHONPATH" python -m build --no-isolation --outdir dist/ --wheel

phase "installPhase (pypaInstallHook: python -m installer --prefix \$out)"
for wheel in dist/*.whl; do
  PYTHONPATH="$buildsimTools:$PYTHONPATH" python -m installer --prefix "$out" "$wheel"
done
export PYTHONPATH="$out/$sitePackages:$PYTHONPATH"

phase "pythonRuntimeDepsCheckHook (bounds relaxed: ${pythonRelaxDeps:-none})"
python - "$out/$sitePackages" "${pythonRelaxDeps:-}" <<'EOF'
"""Every Requires-Dist of the installed wheel is on PYTHONPATH (and in its bounds unless relaxed)."""
import importlib.metadata as metadata
import sys

from packaging.requirements import Requirement

site, relaxed = sys.argv[1], sys.argv[2].split()
(dist,) = metadata.distributions(path=[site])
missing = []
for line in dist.requires or []:
    requirement = Requirement(line)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue
    try:
        found = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        missing.append(f"{requirement.name} not installed")
        continue
    if "*" not in relaxed and requirement.name not in relaxed and not requirement.specifier.contains(found, True):
        missing.append(f"{requirement.name} {found} not in {requirement.specifier}")
if missing:
    sys.exit("runtime dependencies not satisfied: " + "; ".join(missing))
print(f"{dist.metadata['Name']}: {len(dist.requires or [])} runtime dependencies found")
EOF

phase "fixupPhase (wrapPythonPrograms: the scripts find \$out and the dependencies)"
python - "$out/bin" "$PYTHONPATH" <<'EOF'
"""Add the build's site directories to each installed script, as nixpkgs' wrapper does."""
import sys
from pathlib import Path

paths = [p for p in sys.argv[2].split(":") if p]
for script in Path(sys.argv[1]).iterdir():
    shebang, _, body = script.read_text().partition("\n")
    sites = f"import site\nfor _path in {paths!r}:\n    site.addsitedir(_path)\n"
    script.write_text(f"{shebang}\n{sites}{body}")
EOF

phase "pythonImportsCheckPhase ($pythonImportsCheck)"
# shellcheck disable=SC2086 # a space-separated list, as nixpkgs passes it
python -c 'import importlib, sys; [importlib.import_module(name) for name in sys.argv[1:]]' $pythonImportsCheck

if [[ -n ${doCheck:-} ]]; then
  phase "installCheckPhase (preCheck, pytestCheckHook, postCheck)"
  eval "$preCheck"
  echo "buildsim: python -m pytest $*"
  python -m pytest "$@"
  eval "$postCheck"
fi
phase "done"
