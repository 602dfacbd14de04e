"""A throwaway Orthanc (Debian's `orthanc` and `orthanc-dicomweb` packages) for the DICOMweb tests.

`orthanc_server()` starts one on a free local port with its own storage folder and
configuration, waits until it answers, and stops it on exit. Only the HTTP server runs (no
DICOM port), bound to localhost.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

# Where Debian installs them.
ORTHANC_PATHS = ("/usr/sbin/Orthanc",)
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
START_TIMEOUT_S = 15.0


def orthanc_binary() -> Path | None:
    """Orthanc's executable, where installed."""
    found = shutil.which("Orthanc")
    candidates = ([found] if found else []) + list(ORTHANC_PATHS)
    return next((Path(p) for p in candidates if Path(p).is_file()), None)


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin, where installed."""
    return next((Path(d) / DICOMWEB_PLUGIN for d in PLUGIN_DIRS if (Path(d) / DICOMWEB_PLUGIN).is_file()), None)


def orthanc_missing() -> str | None:
    """Why an Orthanc with DICOMweb cannot be started here, or None when it can."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return f"Orthanc's DICOMweb plugin ({DICOMWEB_PLUGIN}) is not installed (apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class OrthancServer:
    """A running Orthanc.

    Attributes:
        url: Its REST root (http://127.0.0.1:PORT).
        auth: (user, password) where authentication is on.
        log: Its log file.
    """

    url: str
    auth: tuple[str, str] | None
    log: Path
    process: subprocess.Popen

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root."""
        return f"{self.url}/dicom-web"

    def upload(self, data: bytes) -> str:
        """Store a DICOM file through Orthanc's REST API (not DICOMweb); its Orthanc ID."""
        response = requests.post(f"{self.url}/instances", data=data, auth=self.auth, timeout=10)
        response.raise_for_status()
        return response.json()["ID"]

    def instance_tags(self, sop_instance_uid: str) -> dict:
        """The stored tags of an instance, looked up by SOP Instance UID through the REST API."""
        found = requests.post(f"{self.url}/tools/lookup", data=sop_instance_uid, auth=self.auth, timeout=10).json()
        ids = [item["ID"] for item in found if item["Type"] == "Instance"]
        if not ids:
            raise KeyError(f"instance {sop_instance_uid} is not in Orthanc")
        return requests.get(f"{self.url}/instances/{ids[0]}/simplified-tags", auth=self.auth, timeout=10).json()

    def instance_count(self) -> int:
        return len(requests.get(f"{self.url}/instances", auth=self.auth, timeout=10).json())

    def stop(self) -> None:
        """Stop it: a throwaway server need not wait out its HTTP threads (a clean stop takes 2-3 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@contextlib.contextmanager
def orthanc_server(root: Path, auth: tuple[str, str] | None = None, lua: str | None = None) -> Iterator[OrthancServer]:
    """Start an Orthanc with DICOMweb in `root` (storage, config, log), stop it on exit.

    Args:
        root: An empty folder for this server.
        auth: (user, password) to turn HTTP authentication on.
        lua: A Lua script to load (e.g. a ReceivedInstanceFilter that refuses some instances).

    Raises:
        RuntimeError: Orthanc is missing, exits, or does not answer within START_TIMEOUT_S.
    """
    reason = orthanc_missing()
    if reason:
        raise RuntimeError(reason)
    port = free_port()
    config = {
        "Name": "SecondLookTest",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "DicomServerEnabled": False,
        "AuthenticationEnabled": auth is not None,
        "RegisteredUsers": {auth[0]: auth[1]} if auth else {},
        "Plugins": [str(dicomweb_plugin())],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "StableAge": 1,
        "HttpTimeout": 10,
    }
    if lua is not None:
        (root / "script.lua").write_text(lua)
        config["LuaScripts"] = [str(root / "script.lua")]
    (root / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = root / "orthanc.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(orthanc_binary()), str(root / "orthanc.json")], stdout=out,
                                   stderr=subprocess.STDOUT, cwd=root)
    server = OrthancServer(url=f"http://127.0.0.1:{port}", auth=auth, log=log, process=process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {process.returncode}: {log.read_text()[-2000:]}")
            try:
                if requests.get(f"{server.url}/system", auth=auth, timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT_S:.0f} s: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield server
    finally:
        server.stop()
