"""Streaming decoders and re-encoders for the Content-Encodings the response rewriter can see through.

The rewriter works on decoded bytes, so a compressed body is decoded, rewritten, and encoded again in the
same encoding, chunk by chunk. Each `Codec` serves one response and holds both directions, because the
encoder must mirror what the decoder found (raw or zlib-wrapped deflate).

Content-Encoding grammar accepted by `parse_content_encoding` (RFC 9110 section 8.4):
    value = [ token *( "," token ) ]     ; tokens are case-insensitive; "identity" tokens are ignored
    token = "gzip" | "x-gzip" | "deflate" | "br" | "zstd" | "identity"
Anything else, or more than one real coding (`gzip, br`), yields None: the body must pass untouched.

Decoding yields bounded pieces, so a small compressed chunk that expands enormously is seen (and can be
refused by the caller's budget) step by step: at most `PIECE` bytes for gzip, deflate and br; for zstd,
whose decompressobj has no output bound, input is fed `ZSTD_SLICE` bytes at a time, and since a zstd
block of 4 bytes can stand for 128 KiB, one slice yields at most about 16 MiB. Malformed or truncated
input raises `BadEncoding`.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator
from typing import Protocol

import brotli
import zstandard

from gateway.errors import Code, GatewayError, GatewayFailure

PIECE = 256 * 1024
ZSTD_SLICE = 512
GZIP_LEVEL = 1  # nginx's gzip_comp_level default: a re-encoded body costs ~4x less CPU than at 6
BROTLI_QUALITY = 4
ZSTD_LEVEL = 3

_ALIASES = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate", "br": "br", "zstd": "zstd"}
_GZIP_WBITS = 16 + zlib.MAX_WBITS


class BadEncoding(GatewayFailure):
    """The upstream body does not decode as its Content-Encoding says; maps to `upstream_bad_encoding`."""

    def __init__(self, encoding: str, reason: str) -> None:
        detail = f"upstream sent a malformed {encoding} body: {reason}"
        super().__init__(GatewayError(Code.UPSTREAM_BAD_ENCODING, detail))
        self.encoding = encoding


@functools.lru_cache(maxsize=256)  # one of a few values in practice: parsed once each
def parse_content_encoding(value: str | None) -> str | None:
    """The one coding to undo ("identity" when none), or None when the body must not be touched."""
    tokens = [token.strip().lower() for token in (value or "").split(",")]
    codings = [token for token in tokens if token and token != "identity"]
    if not codings:
        return "identity"
    if len(codings) > 1:
        return None
    return _ALIASES.get(codings[0])


class Codec(Protocol):
    """Both directions of one response's Content-Encoding."""

    def decode(self, data: bytes) -> Iterator[bytes]:
        """Decoded pieces of `data` (with anything held back from earlier calls)."""
        ...

    def decode_end(self) -> bytes:
        """The last decoded bytes; raises `BadEncoding` when the input stopped mid-stream."""
        ...

    def encode(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes:
        """Everything encoded so far, made decodable now (a sync flush) so streamed bodies stay live."""
        ...

    def encode_end(self) -> bytes: ...


def open_codec(encoding: str) -> Codec:
    """A fresh codec for one response; `encoding` is a value returned by `parse_content_encoding`."""
    if encoding == "identity":
        return _Identity()
    if encoding in ("gzip", "deflate"):
        return _Zlib(encoding)
    if encoding == "br":
        return _Brotli()
    if encoding == "zstd":
        return _Zstd()
    raise ValueError(f"unsupported content encoding {encoding!r}")


class _Identity:
    def decode(self, data: bytes) -> Iterator[bytes]:
        if data:
            yield data

    def decode_end(self) -> bytes:
        return b""

    def encode(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""

    def encode_end(self) -> bytes:
        return b""


def _is_zlib_header(head: bytes) -> bool:
    """RFC 1950 header check; `deflate` bodies in the wild are often raw RFC 1951 streams instead."""
    return head[0] & 0x0F == 8 and head[0] >> 4 <= 7 and (head[0] << 8 | head[1]) % 31 == 0


class _Zlib:
    """gzip (any number of members) and deflate (zlib-wrapped or raw, re-encoded the same way)."""

    def __init__(self, encoding: str) -> None:
        self._name = encoding
        self._wbits: int | None = _GZIP_WBITS if encoding == "gzip" else None
        self._head = b""
        self._dec = zlib.decompressobj(_GZIP_WBITS) if encoding == "gzip" else None
        self._enc: zlib._Compress | None = None
        self._seen = False

    def decode(self, data: bytes) -> Iterator[bytes]:
        self._seen = self._seen or bool(data)
        if self._dec is None:
            self._head += data
            if len(self._head) < 2:
                return
            self._wbits = zlib.MAX_WBITS if _is_zlib_header(self._head) else -zlib.MAX_WBITS
            self._dec = zlib.decompressobj(self._wbits)
            data, self._head = self._head, b""
        try:
            yield from self._inflate(self._dec, data)
        except zlib.error as exc:
            raise BadEncoding(self._name, str(exc)) from None

    def _inflate(self, dec: zlib._Decompress, data: bytes) -> Iterator[bytes]:
        while True:
            out = dec.decompress(data, PIECE)
            if out:
                yield out
            if dec.eof:
                if not dec.unused_data:
                    return
                if self._name != "gzip":
                    raise BadEncoding(self._name, "data after the end of the stream")
                data, dec = dec.unused_data, zlib.decompressobj(_GZIP_WBITS)
                self._dec = dec
                continue
            data = dec.unconsumed_tail
            if not data and len(out) < PIECE:
                return

    def decode_end(self) -> bytes:
        if not self._seen:
            return b""
        if self._dec is None or not self._dec.eof:
            raise BadEncoding(self._name, "truncated stream")
        return b""

    def _encoder(self) -> zlib._Compress:
        if self._enc is None:
            self._enc = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, self._wbits or _GZIP_WBITS)
        return self._enc

    def encode(self, data: bytes) -> bytes:
        return self._encoder().compress(data)

    def flush(self) -> bytes:
        return self._encoder().flush(zlib.Z_SYNC_FLUSH)

    def encode_end(self) -> bytes:
        return self._encoder().flush(zlib.Z_FINISH) if self._seen else b""


class _Brotli:
    def __init__(self) -> None:
        self._dec = brotli.Decompressor()
        self._enc = brotli.Compressor(mode=brotli.MODE_TEXT, quality=BROTLI_QUALITY)
        self._seen = False

    def decode(self, data: bytes) -> Iterator[bytes]:
        self._seen = self._seen or bool(data)
        try:
            out = self._dec.process(data, output_buffer_limit=PIECE)
            while out:
                yield out
                out = self._dec.process(b"", output_buffer_limit=PIECE)
        except brotli.error as exc:
            raise BadEncoding("br", str(exc) or "decoder failed") from None

    def decode_end(self) -> bytes:
        if self._seen and not self._dec.is_finished():
            raise BadEncoding("br", "truncated stream")
        return b""

    def encode(self, data: bytes) -> bytes:
        return bytes(self._enc.process(data))

    def flush(self) -> bytes:
        return bytes(self._enc.flush())

    def encode_end(self) -> bytes:
        return bytes(self._enc.finish()) if self._seen else b""


class _Zstd:
    """zstd, any number of frames; one frame is written back, flushed block by block."""

    def __init__(self) -> None:
        self._dec = zstandard.ZstdDecompressor().decompressobj()
        self._enc = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
        self._seen = False

    def decode(self, data: bytes) -> Iterator[bytes]:
        self._seen = self._seen or bool(data)
        view = memoryview(data)
        try:
            while view:
                if self._dec.eof:
                    self._dec = zstandard.ZstdDecompressor().decompressobj()
                slice_, view = view[:ZSTD_SLICE], view[ZSTD_SLICE:]
                out = self._dec.decompress(slice_)
                if self._dec.eof and self._dec.unused_data:  # the next frame starts inside this slice
                    view = memoryview(self._dec.unused_data + bytes(view))
                if out:
                    yield out
        except zstandard.ZstdError as exc:
            raise BadEncoding("zstd", str(exc)) from None

    def decode_end(self) -> bytes:
        if self._seen and not self._dec.eof:
            raise BadEncoding("zstd", "truncated stream")
        return b""

    def encode(self, data: bytes) -> bytes:
        return self._enc.compress(data)

    def flush(self) -> bytes:
        return self._enc.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def encode_end(self) -> bytes:
        return self._enc.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH) if self._seen else b""
