"""docs/admin-api.md: "Rotating the token file ends existing sessions." Checked on the real
process: a dashboard session that could change the configuration cannot any more once the
token file holds a new token, and nothing it sends after that reaches the config file."""

from __future__ import annotations

import re
from itertools import count
from pathlib import Path

import httpx
from support.sidecar_process import free_port, wait_until
from support.sidecars import StartSidecar

OLD_TOKEN = "admin-token-before-rotation-Kq83"
NEW_TOKEN = "admin-token-after-rotation-Mv27"
DEADLINE = 15.0  # the file watch polls twice a second; a loaded machine gets slack


def _csrf(html: str) -> str:
    found = re.search(r'name="_csrf" value="([^"]+)"', html)
    assert found, html[:2000]
    return found.group(1)


def test_rotating_the_admin_token_file_ends_existing_sessions(
        tmp_path: Path, start_sidecar: StartSidecar) -> None:
    """Promise (docs/admin-api.md): "Rotating the token file ends existing sessions."."""
    admin = f"127.0.0.1:{free_port()}"
    (tmp_path / "secrets").mkdir()
    token_file = tmp_path / "secrets" / "admin-token"
    token_file.write_text(OLD_TOKEN + "\n")
    running = start_sidecar({
        "admin": {"listen": admin, "token_file": "secrets/admin-token"},
        "connections": {"c": {"url": "https://127.0.0.1:9/fhir"}},
    }, directory=tmp_path)
    config, sidecar = running.config_path, running.process
    names = (f"made-{i}" for i in count())

    def create(client: httpx.Client, csrf: str) -> tuple[str, httpx.Response]:
        name = next(names)
        return name, client.post("/basic-auth", data={
            "_csrf": csrf, "action": "save", "name": name, "username": "u",
            "password": "rotation-pw-Tt52"})

    with httpx.Client(base_url=f"http://{admin}", trust_env=False, timeout=30,
                      follow_redirects=True) as session:
        assert session.post("/login", data={"token": OLD_TOKEN}).status_code in (200, 303)
        csrf = _csrf(session.get("/basic-auth").text)
        name, made = create(session, csrf)
        assert made.status_code == 200 and "created" in made.text, made.text
        assert name in config.read_text()

        staged = token_file.with_suffix(".staged")
        staged.write_text(NEW_TOKEN + "\n")
        staged.replace(token_file)

        refused: list[tuple[str, httpx.Response]] = []

        def session_refused() -> bool:
            attempt = create(session, csrf)
            if "created" in attempt[1].text:
                return False
            refused.append(attempt)
            return True

        wait_until(session_refused, DEADLINE, interval=0.2, message="the session to end")
        name, answer = refused[-1]
        assert answer.status_code in (401, 403), (answer.status_code, answer.text[:500])
        # Ended for good, not a hiccup: the next change through it is refused too.
        name2, again = create(session, csrf)
        assert again.status_code in (401, 403) and "created" not in again.text
        text = config.read_text()
        assert name not in text and name2 not in text

        # The old token no longer logs in; the new one does.
        with httpx.Client(base_url=f"http://{admin}", trust_env=False, timeout=30,
                          follow_redirects=True) as fresh:
            assert fresh.post("/login", data={"token": OLD_TOKEN}).status_code == 401
            # A wrong token makes this address wait a moment (429), so retry until it is heard.
            wait_until(lambda: fresh.post("/login", data={"token": NEW_TOKEN}).status_code
                       in (200, 303), DEADLINE, interval=0.3, message="login with the new token")
            name3, made = create(fresh, _csrf(fresh.get("/basic-auth").text))
            assert made.status_code == 200 and "created" in made.text, made.text
            assert name3 in config.read_text()
        assert sidecar.proc is not None and sidecar.proc.poll() is None
