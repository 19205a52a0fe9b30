"""The README's demo command, run as a user would: real process, real HTTP."""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import signal
import sys

import aiohttp

from gateway.testing.demo import DEMO_APPID, DOUYIN_APPID
from gateway.testing.embedded import free_port
from packages import debian_package


async def start_demo(port: int) -> tuple[asyncio.subprocess.Process, bytes]:
    """The demo as README starts it, once it has printed its walkthrough."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.testing.demo", "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    banner = b""
    try:
        async with asyncio.timeout(20):
            while b"Press Ctrl+C" not in banner:
                line = await proc.stdout.readline()
                assert line, f"demo exited early: {banner.decode()}"
                banner += line
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, banner


async def test_demo_serves_login_and_protected_call_then_stops_cleanly() -> None:
    port = free_port()
    proc, banner = await start_demo(port)
    try:
        base = f"http://127.0.0.1:{port}"
        assert f"curl -s -X POST {base}/auth/login".encode() in banner
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/auth/login",
                                 json={"appid": DEMO_APPID, "code": "alice"}) as resp:
                assert resp.status == 200
                login = await resp.json()
            async with http.post(f"{base}/auth/login",
                                 json={"appid": DOUYIN_APPID, "code": "alice"}) as resp:
                assert resp.status == 200
                douyin = await resp.json()
            async with http.get(f"{base}/api/me",
                                headers={"Authorization": f"Bearer {douyin['token']}",
                                         "X-MP-Platform": "wechat"}) as resp:
                assert resp.status == 200
                echoed_douyin = await resp.json()
            async with http.get(f"{base}/api/orders?page=1",
                                headers={"Authorization": f"Bearer {login['token']}",
                                         "X-WX-OpenID": "forged"}) as resp:
                assert resp.status == 200
                echoed = await resp.json()
            async with http.get(f"{base}/api/orders") as resp:
                assert resp.status == 401
            async with http.get(f"{base}/admin/users",
                                headers={"Authorization": f"Bearer {login['token']}",
                                         "X-User-Roles": "admin"}) as resp:
                assert resp.status == 403
                assert (await resp.json())["error"] == "forbidden_role"
        assert echoed["path"] == "/api/orders" and echoed["query"] == "page=1"
        assert echoed["headers"]["X-WX-OpenID"] == login["openid"]
        assert echoed["headers"]["X-User-ID"] == f"u-{login['openid'][:8]}"
        assert echoed["headers"]["X-User-Roles"] == "user"
        assert "Authorization" not in echoed["headers"]
        # two platforms side by side: each user arrives with their own
        assert echoed["headers"]["X-MP-Platform"] == "wechat"
        assert echoed_douyin["headers"]["X-MP-Platform"] == "douyin"
        assert echoed_douyin["headers"]["X-WX-OpenID"] == douyin["openid"] != login["openid"]
        assert echoed_douyin["headers"]["X-WX-AppID"] == DOUYIN_APPID
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# A printed command and the status it promises: "   <command>  # 200".
_COMMAND = re.compile(r"^   ((?:[A-Z]+=\$\()?curl .*?)\s+# (\d{3})$")


async def test_every_printed_command_answers_as_the_walkthrough_says_when_pasted_in_order(
        ) -> None:
    curl = debian_package("curl", lambda: shutil.which("curl"))
    port = free_port()
    proc, banner = await start_demo(port)
    try:
        steps = [m.groups() for m in map(_COMMAND.match, banner.decode().splitlines()) if m]
        assert len(steps) >= 14, banner.decode()
        assert "/auth/logout" in steps[-2][0], "logging out must come after every use of $TOKEN"
        # One shell, as a user pasting them would have; each curl also reports its status on
        # stderr, one line per call, so a command substitution's call is counted too.
        script = "\n".join(
            [f"curl() {{ {shlex.quote(curl)} -w '%{{stderr}}%{{http_code}}\\n' \"$@\"; }}"]
            + [command for command, _ in steps])
        shell = await asyncio.create_subprocess_exec(
            "bash", "-c", script, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(60):
            out, err = await shell.communicate()
        statuses = err.decode().split()
        assert [(command, status) for (command, _), status in zip(steps, statuses)] == steps, (
            out.decode())
        assert len(statuses) == len(steps), err.decode()
        assert "X-WX-OpenID" in out.decode() and "forged" not in out.decode()
        assert '"X-MP-Platform": "wechat"' in out.decode()
        assert '"X-MP-Platform": "douyin"' in out.decode()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(15):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
