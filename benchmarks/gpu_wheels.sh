#!/usr/bin/env bash
# The wheels that benchmarks/gpu_check.sh needs on a lent GPU machine, whose image reaches no registry:
# every package of pyproject.toml's dependencies, and of what they need, that the image lacks
# (benchmarks/gpu_image.txt), resolved for the image's Python (CPython 3.12, manylinux x86_64), one
# version of each, into .whl/ at the root of the repository the command runs in (ignored through
# .git/info/exclude). torch, torchvision, triton and nvidia-* never travel: the check runs with the image's
# torch (2.11.0, not the 2.14.1 that pyproject.toml pins), which stands in the resolution as a stub wheel
# of the image's version, so that nothing downloads it.
#
#   cd REPO && bash benchmarks/gpu_wheels.sh        # then the device call carries [".whl"]
#
# Needs PyPI and the project installed here (`pip install -e ".[dev]"`): the versions installed here (the
# ones the tests pass with) constrain the resolution, exactly for pure-Python packages, as a lower bound
# for compiled ones (the version here may have no 3.12 wheel), except for the packages whose version on
# the image is known (gpu_image.txt's `name==version` lines), which are pinned to it. A package published
# only as a source archive (antlr4-python3-runtime, hydra-core's) is built here into a pure-Python wheel.
# Prints each wheel and the total, and refuses a set over 50 MiB (the working tree travels within 64 MiB).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(git rev-parse --show-toplevel)
cd "$root"
image=${GPU_IMAGE:-$here/gpu_image.txt}
py=${PYTHON:-python3}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
SDIST_ONLY=(antlr4-python3-runtime)

# requirements (pyproject.toml's, less torch / torchvision), constraints, stub wheels of the image's torch
"$py" - "$root/pyproject.toml" "$image" "$work" "${SDIST_ONLY[@]}" <<'PY'
import importlib.metadata as md
import re
import sys
import tomllib
import zipfile
from pathlib import Path

pyproject, image, work, *sdist_only = sys.argv[1:]
work = Path(work)


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


NEVER = ("torch", "torchvision", "torchaudio", "triton")
deps = tomllib.loads(Path(pyproject).read_text())["project"]["dependencies"]
reqs = [d for d in deps if norm(re.split(r"[\s<>=!~;\[]", d, 1)[0]) not in NEVER]
(work / "requirements.txt").write_text("\n".join(reqs) + "\n")
pins = {}  # what is installed here: the versions the tests pass with (compiled ones: or later, for 3.12)
for dist in md.distributions():
    name = norm(dist.metadata["Name"])
    if name not in NEVER and not name.startswith("nvidia-") and name != "dmq-pipeline":
        pure = re.search(r"^Tag: .*-none-any$", dist.read_text("WHEEL") or "", re.M)
        pins[name] = ("==" if pure else ">=") + dist.version
stubs = work / "stubs"
stubs.mkdir()
for line in Path(image).read_text().splitlines():
    if "==" in line and not line.startswith("#"):
        name, version = (s.strip() for s in line.split("=="))
        name = norm(name)
        if name in NEVER:  # an empty wheel of the image's version: the resolver reads it and downloads nothing
            version += "+image"
            dist = f"{name.replace('-', '_')}-{version}"
            with zipfile.ZipFile(stubs / f"{dist}-py3-none-any.whl", "w") as whl:
                whl.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
                whl.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
                whl.writestr(f"{dist}.dist-info/RECORD", "")
        pins[name] = "==" + version
lines = [f"{name}{pin}" for name, pin in sorted(pins.items()) if name not in sdist_only]
(work / "constraints.txt").write_text("\n".join(lines) + "\n")
(work / "sdist_only.txt").write_text("".join(f"{n}{pins[n]}\n" for n in sdist_only if n in pins))
PY

mkdir -p "$work/built" "$work/all"
echo "building the source-only packages: $(tr '\n' ' ' <"$work/sdist_only.txt")"
"$py" -m pip wheel -q --no-deps --no-binary :all: -w "$work/built" -r "$work/sdist_only.txt"
echo "resolving pyproject.toml's dependencies for CPython 3.12 manylinux x86_64 (downloads every wheel)"
"$py" -m pip download -q "${target[@]}" --find-links "$work/stubs" --find-links "$work/built" \
  -c "$work/constraints.txt" -r "$work/requirements.txt" -d "$work/all"

# keep what the image lacks; one version each
rm -rf .whl
mkdir .whl
"$py" - "$image" "$work/all" .whl <<'PY'
import re
import shutil
import sys
import zipfile
from pathlib import Path

image, found, out = sys.argv[1:]


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


on_image = {}
for line in Path(image).read_text().splitlines():
    if line.strip() and not line.startswith("#"):
        name, _, version = line.partition("==")
        on_image[norm(name)] = version.strip() or "?"
kept, needs = [], {}
for whl in sorted(Path(found).glob("*.whl")):
    name = norm(whl.name.split("-")[0])
    if name in on_image or name.startswith("nvidia-") or "+image" in whl.name:
        continue
    kept.append(whl)
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for req in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        if "extra ==" in req:
            continue
        dep = norm(re.split(r"[\s<>=!~;\[(]", req, 1)[0])
        if dep in on_image:
            needs.setdefault(dep, set()).add(f"{name}: {req.strip()}")
names = [norm(w.name.split("-")[0]) for w in kept]
assert len(names) == len(set(names)), "two versions of one package"
for whl in kept:
    shutil.copy(whl, out)
    print(f"{whl.stat().st_size / 2**20:7.2f} MiB  {whl.name}")
total = sum(w.stat().st_size for w in kept)
print(f"{len(kept)} wheels, {total / 2**20:.1f} MiB in {out}")
print("what they need from the image (its version where known; `pip check` on the device checks the rest):")
for dep in sorted(needs):
    print(f"  {dep} ({on_image[dep]}): {'; '.join(sorted(needs[dep]))}")
if total > 50 * 2**20:
    sys.exit("over 50 MiB: the working tree travels within 64 MiB")
PY
