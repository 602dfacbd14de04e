"""A browser-less Streamlit session: the websocket protocol a browser tab speaks, in Python.

Enough of it to open a page, upload a file the way the file uploader does, and wait for
the script run to finish, so that many sessions can be driven at once (`benchmarks.load`)
and the server's first page can be timed (`benchmarks.coldstart`).

Protocol (Streamlit's own protobufs): connect to /_stcore/stream with the subprotocols
["streamlit", xsrf-cookie]; the server sends `new_session` (with the session id); a
`rerun_script` BackMsg runs a page; its deltas stream back until `script_finished`. An upload
is a `file_urls_request`, an HTTP PUT of the file to the URL the server hands back, and a
rerun whose widget states carry the uploader's `file_uploader_state_value`. Media (images)
are fetched over HTTP, as a browser would.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field

XSRF_COOKIE = "_streamlit_xsrf"


class SessionError(RuntimeError):
    """The server answered with an error, an exception element, or not at all."""


@dataclass
class RunResult:
    """What one script run sent back."""

    seconds: float
    texts: list[str] = field(default_factory=list)
    image_urls: list[str] = field(default_factory=list)
    inline_images: list[str] = field(default_factory=list)
    heatmap_at: float | None = None  # time.monotonic() when the viewer with the overlay arrived
    uploader_ids: list[str] = field(default_factory=list)
    widgets: dict[str, str] = field(default_factory=dict)
    exceptions: list[str] = field(default_factory=list)

    def says(self, text: str) -> bool:
        return any(text in t for t in self.texts)


def _http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        path = parsed.path + (f"?{parsed.query}" if parsed.query else "")
        connection.request(method, path or "/", body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def _xsrf_cookie(base_url: str) -> str | None:
    """The XSRF cookie the server sets on its health endpoint, as the browser's first call gets it.

    None where XSRF protection is off.
    """
    _, headers, _ = _http("GET", base_url + "/_stcore/health")
    cookie = headers.get("set-cookie", "")
    for part in cookie.split(";"):
        name, _, value = part.strip().partition("=")
        if name == XSRF_COOKIE:
            return value
    return None


def _collect(msg, result: RunResult) -> None:
    """Text, images, uploader ids and exceptions from one ForwardMsg delta."""
    if msg.WhichOneof("type") != "delta" or msg.delta.WhichOneof("type") != "new_element":
        return
    element = msg.delta.new_element
    kind = element.WhichOneof("type")
    if kind == "exception":
        result.exceptions.append(f"{element.exception.type}: {element.exception.message}")
    elif kind == "file_uploader":
        result.uploader_ids.append(element.file_uploader.id)
    elif kind == "imgs":
        result.image_urls.extend(image.url for image in element.imgs.imgs)
    elif kind == "plotly_chart":  # the image viewer: its images travel inside the figure as data: URIs
        figure = json.loads(element.plotly_chart.spec or "{}")
        result.inline_images.extend(t.get("source", "") for t in figure.get("data", []) if t.get("type") == "image")
    elif kind is not None:
        inner = getattr(element, kind)
        if isinstance(getattr(inner, "id", None), str) and getattr(inner, "label", ""):
            result.widgets[inner.label] = inner.id  # widget label -> id, for later widget states
        for name in ("body", "label"):
            text = getattr(inner, name, None)
            if isinstance(text, str) and text:
                result.texts.append(text)


class AppSession:
    """One Streamlit session over a websocket, driven like a browser tab.

    Use as `async with AppSession(url) as session:`; then `await session.run(page)` and
    `await session.upload(page, name, data)`.
    """

    def __init__(self, base_url: str, timeout: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session_id = ""
        self.page_hashes: dict[str, str] = {}
        self._socket = None
        self._xsrf: str | None = None
        self.last_upload_state = None

    async def __aenter__(self) -> "AppSession":
        import websockets

        self._xsrf = await asyncio.to_thread(_xsrf_cookie, self.base_url)
        ws_url = "ws" + self.base_url[len("http"):] + "/_stcore/stream"
        headers = {"Cookie": f"{XSRF_COOKIE}={self._xsrf}"} if self._xsrf else {}
        protocols = ["streamlit", self._xsrf] if self._xsrf else ["streamlit"]
        self._socket = await websockets.connect(ws_url, subprotocols=protocols, additional_headers=headers,
                                                max_size=64 * 2**20, open_timeout=30)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._socket is not None:
            await self._socket.close()

    async def _receive(self, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SessionError("no answer from the server in time")
        try:
            data = await asyncio.wait_for(self._socket.recv(), left)
        except asyncio.TimeoutError:
            raise SessionError("no answer from the server in time") from None
        return data if isinstance(data, bytes) else data.encode()

    async def _send(self, back_msg) -> None:
        await self._socket.send(back_msg.SerializeToString())

    async def run(self, page: str = "", widgets: list | None = None) -> RunResult:
        """Run a page (its URL path, "" for home) with these widget states; wait for the run to end."""
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.ClientState_pb2 import ClientState
        from streamlit.proto.WidgetStates_pb2 import WidgetStates

        state = ClientState(query_string="", page_script_hash=self.page_hashes.get(page, ""), page_name=page,
                            widget_states=WidgetStates(widgets=widgets or []))
        started = time.monotonic()
        await self._send(BackMsg(rerun_script=state))
        return await self._wait_finished(started)

    async def _wait_finished(self, started: float) -> RunResult:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        result = RunResult(seconds=0.0)
        deadline = started + self.timeout
        while True:
            msg = ForwardMsg()
            msg.ParseFromString(await self._receive(deadline))
            kind = msg.WhichOneof("type")
            if kind == "new_session":  # the first run of a connection says who we are
                self.session_id = msg.new_session.initialize.session_id
            elif kind == "navigation":  # the pages and their script hashes, as the sidebar shows them
                self.page_hashes = {("" if p.is_default else p.url_pathname): p.page_script_hash
                                    for p in msg.navigation.app_pages}
            _collect(msg, result)
            if result.heatmap_at is None and len(result.inline_images) >= 2:
                result.heatmap_at = time.monotonic()
            if kind == "script_finished":
                if msg.script_finished == ForwardMsg.FINISHED_EARLY_FOR_RERUN:
                    continue
                if msg.script_finished == ForwardMsg.FINISHED_WITH_COMPILE_ERROR:
                    raise SessionError("the page failed to compile")
                if msg.script_finished == ForwardMsg.FINISHED_SUCCESSFULLY:
                    break
        for url in result.image_urls:  # a browser fetches the images before the reader sees them
            status, _, _ = await asyncio.to_thread(_http, "GET", urllib.parse.urljoin(self.base_url + "/", url))
            if status != 200:
                raise SessionError(f"image {url} answered {status}")
        result.seconds = time.monotonic() - started
        return result

    async def upload(self, page: str, name: str, data: bytes, uploader_id: str) -> RunResult:
        """Upload one file through the page's file uploader and wait for the run it triggers."""
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.Common_pb2 import FileURLsRequest, FileUploaderState, UploadedFileInfo
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
        from streamlit.proto.WidgetStates_pb2 import WidgetState

        started = time.monotonic()
        request_id = uuid.uuid4().hex
        await self._send(BackMsg(file_urls_request=FileURLsRequest(request_id=request_id, file_names=[name],
                                                                    session_id=self.session_id)))
        deadline = started + self.timeout
        while True:
            msg = ForwardMsg()
            msg.ParseFromString(await self._receive(deadline))
            if msg.WhichOneof("type") == "file_urls_response" and msg.file_urls_response.response_id == request_id:
                break
        response = msg.file_urls_response
        if response.error_msg:
            raise SessionError(f"upload refused: {response.error_msg}")
        urls = response.file_urls[0]
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        if self._xsrf:
            headers.update({"X-Xsrftoken": self._xsrf, "Cookie": f"{XSRF_COOKIE}={self._xsrf}"})
        status, _, answer = await asyncio.to_thread(
            _http, "PUT", urllib.parse.urljoin(self.base_url + "/", urls.upload_url), body, headers)
        if status not in (200, 204):
            raise SessionError(f"upload answered {status}: {answer[:200]!r}")
        info = UploadedFileInfo(file_id=urls.file_id, name=name, size=len(data), file_urls=urls)
        widget = WidgetState(id=uploader_id, file_uploader_state_value=FileUploaderState(uploaded_file_info=[info]))
        self.last_upload_state = widget  # later reruns on the same upload send it again, as a browser does
        result = await self.run(page, [widget])
        result.seconds = time.monotonic() - started
        return result
