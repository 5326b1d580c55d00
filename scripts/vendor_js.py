"""Vendor the map page's JavaScript from the npm registry into pixels_xr/serve/static/vendor/.

``pixels-xr serve`` must work offline, so the built files of maplibre-gl and pmtiles ship inside the package.
This script fetches the pinned versions with ``npm pack`` (the ordinary client, its configured registry),
checks each tarball against the integrity npm reports, copies the built files unchanged and writes
``VENDOR.json``: per package its version, licence, the tarball's integrity and each file's sha256, plus the
licence texts. ``tests/test_serve.py`` checks the files against that record.

Run it to update (edit the pins first)::

    .venv/bin/python scripts/vendor_js.py

pmtiles' npm package carries no licence file; its licence (BSD-3-Clause, per its package.json) is written
out with the copyright line of its project. Its browser bundle includes fflate (MIT), whose licence file is
taken from fflate's own npm package.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENDOR = REPO / "pixels_xr" / "serve" / "static" / "vendor"

#: name -> (version, files copied from the package, licence file in the package or None)
PACKAGES: dict[str, tuple[str, list[str], str | None]] = {
    "maplibre-gl": ("6.20.0", ["dist/maplibre-gl.mjs", "dist/maplibre-gl-worker.mjs", "dist/maplibre-gl.css"],
                    "LICENSE.txt"),
    "pmtiles": ("4.5.0", ["dist/pmtiles.js"], None),
}
#: Packages bundled inside a vendored file: only their licence is taken.
BUNDLED: dict[str, tuple[str, str, str]] = {"fflate": ("0.8.2", "LICENSE", "pmtiles")}

BSD3 = """Copyright {holder}

Redistribution and use in source and binary forms, with or without modification, are permitted provided that
the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this list of conditions and the
   following disclaimer.
2. Redistributions in binary form must reproduce the above copyright notice, this list of conditions and the
   following disclaimer in the documentation and/or other materials provided with the distribution.
3. Neither the name of the copyright holder nor the names of its contributors may be used to endorse or
   promote products derived from this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED
WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A
PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY
DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO,
PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE
OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH
DAMAGE.
"""
#: Copyright lines of packages that ship no licence file (from their projects' LICENSE files).
HOLDERS = {"pmtiles": "2021 Protomaps LLC"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pack(name: str, version: str, dest: Path) -> tuple[Path, dict]:
    """``npm pack name@version`` into ``dest``; returns (extracted package folder, npm's record)."""
    out = subprocess.run(["npm", "pack", f"{name}@{version}", "--json", "--pack-destination", str(dest)],
                         check=True, capture_output=True, text=True)
    record = json.loads(out.stdout)[0]
    tarball = dest / record["filename"]
    algo, _, digest = record["integrity"].partition("-")
    if hashlib.new(algo, tarball.read_bytes()).digest() != base64.b64decode(digest):
        raise SystemExit(f"{tarball.name}: integrity does not match {record['integrity']}")
    folder = dest / f"{name}-{version}"
    with tarfile.open(tarball) as tar:
        tar.extractall(folder, filter="data")
    return folder / "package", record


def main() -> int:
    if VENDOR.exists():
        shutil.rmtree(VENDOR)
    VENDOR.mkdir(parents=True)
    record: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (version, files, licence) in PACKAGES.items():
            package, npm = pack(name, version, Path(tmp))
            meta = json.loads((package / "package.json").read_text())
            entry = {"version": meta["version"], "license": meta["license"], "integrity": npm["integrity"],
                     "files": {}}
            for rel in files:
                target = VENDOR / Path(rel).name
                shutil.copyfile(package / rel, target)
                entry["files"][target.name] = sha256(target)
            licence_file = VENDOR / f"LICENSE.{name}.txt"
            if licence is not None:
                shutil.copyfile(package / licence, licence_file)
            else:
                if meta["license"] != "BSD-3-Clause":
                    raise SystemExit(f"{name}: no licence file and licence {meta['license']}: add its text")
                licence_file.write_text(BSD3.format(holder=HOLDERS[name]))
            entry["license_file"] = licence_file.name
            record[name] = entry
        for name, (version, licence, inside) in BUNDLED.items():
            package, npm = pack(name, version, Path(tmp))
            meta = json.loads((package / "package.json").read_text())
            shutil.copyfile(package / licence, VENDOR / f"LICENSE.{name}.txt")
            record[name] = {"version": meta["version"], "license": meta["license"],
                            "integrity": npm["integrity"], "bundled_in": inside, "files": {},
                            "license_file": f"LICENSE.{name}.txt"}
    (VENDOR / "VENDOR.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    for name, entry in record.items():
        files = ", ".join(entry["files"]) or "licence only"
        print(f"{name} {entry['version']} ({entry['license']}): {files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
