"""Read an upload from the request stream into memory, with a size cap; nothing touches the disk.

FastAPI's `UploadFile` goes through Starlette's multipart parser, which spools any file over
1 MB to a temporary file on disk (`MultiPartParser.spool_max_size`); most DICOM files and X-ray
exports are larger. So the body is read here, chunk by chunk as it arrives, through
python-multipart's streaming parser, and only the `file` part's bytes are kept, in memory. A body
over the cap is refused with 413 as soon as its declared length or its bytes pass the cap.

Two request forms are accepted:

- `multipart/form-data` with the scan in the field `file` (what `curl -F file=@scan.dcm` and
  browsers send); its filename is kept as the upload's name;
- the raw bytes with `Content-Type: application/octet-stream`, `application/dicom` or `image/*`
  (`curl --data-binary @scan.dcm`); the name may be given as the `filename` query parameter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ApiError

FILE_FIELD = "file"
RAW_TYPES = ("application/octet-stream", "application/dicom", "application/zip", "application/gzip")
MAX_PARTS = 16  # a client sends the file and perhaps a field or two; a body of thousands of parts is refused


@dataclass(frozen=True)
class Upload:
    """One uploaded file, in memory.

    Attributes:
        data: The file's bytes.
        filename: The name it was sent under (a hint for DICOM without a preamble; never logged), or None.
    """

    data: bytes
    filename: str | None


def too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"The request is larger than the {limit / 2**20:.0f} MB this server accepts.")


def check_declared_length(headers: dict[str, str] | object, limit: int) -> None:
    """Refuse a body whose Content-Length passes the limit, before reading any of it."""
    declared = headers.get("content-length")  # type: ignore[union-attr]
    if declared is None:
        return
    try:
        length = int(declared)
    except ValueError:
        raise ApiError(400, "bad_request", "The Content-Length header is not a number.") from None
    if length > limit:
        raise too_large(limit)


class _FilePart:
    """Callbacks for python-multipart's parser that keep the `file` field's bytes and name, and nothing else."""

    def __init__(self) -> None:
        self.parts = 0
        self.ended = False
        self.found = False
        self.filename: str | None = None
        self.data = bytearray()
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._keep = False

    def callbacks(self) -> dict:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_end": self._end}

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise ApiError(400, "bad_request", f"The request has more than {MAX_PARTS} multipart parts.")
        self._headers.clear()
        self._keep = False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") == FILE_FIELD.encode() and not self.found:
            self.found = self._keep = True
            name = options.get(b"filename")
            self.filename = name.decode("utf-8", "replace") if name is not None else None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._keep:
            self.data += data[start:end]

    def _end(self) -> None:
        self.ended = True


async def _capped(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise too_large(limit)
        yield chunk


async def read_upload(headers: object, stream: AsyncIterator[bytes], limit: int, filename: str | None = None) -> Upload:
    """The uploaded file from a request's headers and body stream, held in memory.

    Args:
        headers: The request headers (a case-insensitive mapping).
        stream: The request body, chunk by chunk (`Request.stream()`).
        limit: Most bytes the body may hold.
        filename: The name for a raw-body upload (the `filename` query parameter).

    Raises:
        ApiError: 413 over the limit, 415 for a content type that carries no file, 400 for a
            malformed multipart body or one without a `file` field.
    """
    check_declared_length(headers, limit)
    media, options = parse_options_header(headers.get("content-type", ""))  # type: ignore[union-attr]
    media_type = media.decode("latin-1").lower()
    if media_type == "multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise ApiError(400, "bad_request", "The multipart request has no boundary in its Content-Type.")
        part = _FilePart()
        try:
            parser = MultipartParser(boundary, part.callbacks())
            async for chunk in _capped(stream, limit):
                parser.write(chunk)
            parser.finalize()
        except MultipartParseError:
            raise ApiError(400, "bad_request", "The multipart body is malformed.") from None
        if not part.found:
            raise ApiError(400, "bad_request", f"The request has no file: send the scan as the multipart field "
                                               f"'{FILE_FIELD}' (curl -F {FILE_FIELD}=@scan.dcm).")
        if not part.ended:
            raise ApiError(400, "bad_request", "The multipart body ended before its closing boundary.")
        return Upload(bytes(part.data), part.filename)
    if media_type in RAW_TYPES or media_type.startswith("image/"):
        body = bytearray()
        async for chunk in _capped(stream, limit):
            body += chunk
        return Upload(bytes(body), filename)
    # the type is the client's own text: named back only when it is a short plain media type
    plain = media_type.replace("/", "").replace("-", "").replace(".", "").replace("+", "").isalnum()
    shown = "none" if not media_type else media_type if plain and len(media_type) <= 80 else "another type"
    raise ApiError(415, "unsupported_type",
                   f"The request's content type ({shown}) carries no file: send multipart/form-data with "
                   f"the field '{FILE_FIELD}', or the raw bytes as application/octet-stream.")
