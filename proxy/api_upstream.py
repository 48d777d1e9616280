"""The containers-storage pull request's two methods, for clients written to it.

The upstream server (``storage/pkg/splitfdstream`` in container-libs pull
request 651) is bound to one store and offers:

- ``GetImage {imageId: "<store image ID or name>"}`` ->
  ``{manifest, config, layerDigests}``, where ``layerDigests`` are in fact the
  store's layer IDs, top layer first;
- ``GetSplitFDStream {layerId, parentId}`` -> a splitfdstream of that layer.

How they map to ours (docs/protocol.md has the table):

- ``GetImage``'s ``imageId`` is resolved as ``containers-storage:IMAGEID``,
  so it may carry a ``[driver@root+runroot]`` store prefix; without one, the
  store of storage.conf is used. The store is remembered for this
  connection, and later ``layerId`` lookups search it first.
- ``GetSplitFDStream`` with ``layerId`` builds the stream straight from the
  store and registers it in the session like ours: the reply has our result
  fields plus upstream's ``streamSize`` and ``totalFDs``, but carries only
  the first ``maxFds`` content files (fd window). When that is every file,
  the stream and its store lock are released as soon as the reply is sent
  (the fds keep the content alive) and ``streamId`` is 0; otherwise the rest
  come from GetSplitFDStreamFiles and CloseSplitFDStream releases the lock,
  as for ours. Upstream sends every fd at once, which cannot work for large
  layers under common fd limits.
- Neither needs Initialize, as upstream has none; our own form of
  GetSplitFDStream still does.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

import anyio
import msgspec

from protocol import api
from protocol.errors import ClientError, NotFoundError, NotInitializedError
from protocol.jsonrpc import INVALID_PARAMS, RpcError

# proxy.api imports this module to register the methods: reach its helpers
# through the module at call time rather than importing names from it.
from proxy import api as session_api
from proxy.legacy_server import open_image
from proxy.rpc_server import Reply
from proxy.transports.base import LayerStream
from proxy.transports.storage import StorageImageSource, layer_stream_by_id
from proxy.transports.storage_store import (
    Store,
    configured_store_location,
    split_store_spec,
)

if TYPE_CHECKING:
    from proxy.api import ApiSession

STORAGE_PREFIX = "containers-storage:"

P = TypeVar("P", bound=msgspec.Struct)


class AddMethod(Protocol):
    """ApiSession.register's way of adding one method."""

    def __call__(
        self,
        name: str,
        params: type[P],
        handler: Callable[[P], Awaitable[Reply]],
        *,
        needs_init: bool = True,
    ) -> None: ...


class UpstreamMethods:
    """GetImage and the ``layerId`` form of GetSplitFDStream for one session.

    It works on the session's own tables (its fd budget, its open streams),
    so both forms share one stream numbering and one fd bound.
    """

    def __init__(self, session: ApiSession) -> None:
        self._session = session
        # Stores that GetImage resolved on this connection, newest last.
        self._stores: dict[str, Store] = {}

    def register(self, add: AddMethod) -> None:
        add("GetImage", api.GetImageParams, self.get_image, needs_init=False)
        # Replaces ours, which it calls for requests without layerId.
        add(
            "GetSplitFDStream",
            api.GetSplitFDStreamAnyParams,
            self.get_splitfdstream,
            needs_init=False,
        )

    async def get_image(self, params: api.GetImageParams) -> Reply:
        name = params.image_id
        if not name.startswith(STORAGE_PREFIX):
            name = STORAGE_PREFIX + name
        image = await open_image(name, self._session._shared.options)
        try:
            source = image.source
            if not isinstance(source, StorageImageSource):
                raise ClientError(f"{name} is not a containers-storage image")
            resolved = await image.resolve()
            layer_ids = await anyio.to_thread.run_sync(source.layer_ids)
        finally:
            await image.close()
        store = source.store
        self._stores.pop(store.location.spec(), None)
        self._stores[store.location.spec()] = store
        return Reply(
            api.GetImageResult(
                manifest=_text(resolved.manifest_raw),
                config=_text(resolved.config_raw),
                layer_digests=layer_ids[::-1],
            )
        )

    async def get_splitfdstream(self, params: api.GetSplitFDStreamAnyParams) -> Reply:
        if params.layer_id is None:
            if self._session._version is None:
                raise NotInitializedError("call Initialize first")
            return await self._session.get_splitfdstream(_ours(params))
        window = session_api._check_window(params.max_fds)
        layer_id = params.layer_id
        stream = await anyio.to_thread.run_sync(
            self._open_layer, layer_id, params.parent_id or ""
        )
        session = self._session
        count = min(window, stream.file_count, session._shared.budget.limit - 1)
        # Every file in this reply: the fds pin the content, so the stream
        # (and its store lock) is released once they are sent, and there is
        # nothing to close (streamId 0), as upstream clients expect.
        complete = count == stream.file_count
        stream_id = 0
        if not complete:
            # The session's own table: GetSplitFDStreamFiles and
            # CloseSplitFDStream then work on this stream unchanged.
            session._last_stream_id += 1
            stream_id = session._last_stream_id
            session._streams[stream_id] = stream
        try:
            release_fds = await session._shared.budget.acquire(count + 1)
            try:
                fds = await anyio.to_thread.run_sync(
                    session_api._open_first_window, stream, count
                )
            except BaseException:
                release_fds()
                raise
        except BaseException:
            if complete:
                stream.close()
            raise
        result = api.UpstreamSplitFDStreamResult(
            stream_id=stream_id,
            diff_id=stream.diff_id,
            tar_size=stream.size,
            file_count=stream.file_count,
            files_included=count,
            stream_size=os.fstat(fds[0]).st_size,
            total_fds=1 + stream.file_count,
        )
        if not complete:
            return Reply(result, fds, on_closed=release_fds)

        def release() -> None:
            release_fds()
            stream.close()

        return Reply(result, fds, on_closed=release)

    def _open_layer(self, layer_id: str, parent_id: str) -> LayerStream:
        location, bare_id = split_store_spec(layer_id)
        if location is not None:
            return layer_stream_by_id(Store(location), bare_id, parent_id)
        candidates = list(reversed(self._stores.values()))
        if not candidates:
            candidates = [Store(configured_store_location())]
        for store in candidates:
            if bare_id in store.layers():
                return layer_stream_by_id(store, bare_id, parent_id)
        raise NotFoundError(
            f'layer not known: "{layer_id}" in '
            + ", ".join(store.location.spec() for store in candidates)
        )


def _ours(params: api.GetSplitFDStreamAnyParams) -> api.GetSplitFDStreamParams:
    if params.image_id is None or params.digest is None:
        missing = "imageId" if params.image_id is None else "digest"
        # Worded as the decoder words a missing field, with the same code.
        raise RpcError(
            INVALID_PARAMS,
            f"Object missing required field `{missing}` (or give `layerId`)",
        )
    return api.GetSplitFDStreamParams(
        image_id=params.image_id, digest=params.digest, max_fds=params.max_fds
    )


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ClientError(
            "document is not valid UTF-8 and cannot be sent as text"
        ) from None
