"""`mqtt-starter simulate-qrs` as a process: it writes the certificates and serves the samples."""

from __future__ import annotations

import json
import shlex
import shutil
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.conftest import free_port


def test_simulate_qrs_serves_the_sample_tasks_to_the_written_certificate(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mqtt_starter",
            "simulate-qrs",
            "--port",
            str(port),
            "--cert-dir",
            str(tmp_path / "certs"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(3)]
        assert lines[0] == f"QRS simulator on https://127.0.0.1:{port} with 13 tasks\n"
        assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == [
            "client.pem",
            "client_key.pem",
            "root.pem",
            "server.pem",
            "server_key.pem",
        ]
        assert (tmp_path / "certs" / "client_key.pem").stat().st_mode & 0o077 == 0
        context = ssl.create_default_context(cafile=str(tmp_path / "certs" / "root.pem"))
        context.load_cert_chain(
            tmp_path / "certs" / "client.pem", tmp_path / "certs" / "client_key.pem"
        )
        request = urllib.request.Request(
            f"https://127.0.0.1:{port}/qrs/task?xrfkey=0123456789abcdef",
            headers={
                "X-Qlik-Xrfkey": "0123456789abcdef",
                "X-Qlik-User": "UserDirectory=INTERNAL; UserId=sa_repository",
            },
        )
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            tasks = json.loads(response.read())
        assert len(tasks) == 13
        assert "Reload Sales" in {t["name"] for t in tasks}
        command = lines[2].removeprefix("try: ").strip()
        if shutil.which("curl") is not None:  # the README's command, as printed
            printed = subprocess.run(
                shlex.split(command), capture_output=True, text=True, timeout=10
            )
            assert json.loads(printed.stdout) == tasks
    finally:
        process.terminate()
        process.wait(10)
