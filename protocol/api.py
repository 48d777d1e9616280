"""The jsonrpc-fdpass image API: every method's params and result.

Names on the wire are camelCase. A field with a default may be omitted by the
client; unknown fields are ignored so that newer clients can talk to older
servers within one API version. Adding a method or an optional field is a
minor change announced through ``features``; anything else bumps the version
that Initialize negotiates.
"""

from __future__ import annotations

import msgspec

#: API versions this server speaks, oldest first.
SUPPORTED_VERSIONS = ("1.0",)

#: Optional capabilities a client may look for in Initialize's result.
FEATURES = (
    "splitfdstream",
    "splitfdstream-windows",
    "blob-verify",
    "manifest-oci-conversion",
    "manifest-unresolved",
)

#: The largest fd window a client may ask of GetSplitFDStream and
#: GetSplitFDStreamFiles; the default keeps both sides far below the common
#: 1024 open-file limit.
MAX_FD_WINDOW = 512
DEFAULT_FD_WINDOW = 256


class _Params(msgspec.Struct, rename="camel", forbid_unknown_fields=False):
    pass


class _Result(msgspec.Struct, rename="camel", omit_defaults=True):
    pass


class InitializeParams(_Params):
    #: API versions the client can speak, in any order.
    versions: list[str]
    client: str = ""


class InitializeResult(_Result):
    version: str
    features: list[str]
    server: str


class OpenImageParams(_Params):
    #: ``transport:reference``, as skopeo copy takes it.
    image_name: str
    #: When true, a missing image is reported as ``imageId: null``.
    optional: bool = False


class OpenImageResult(msgspec.Struct, rename="camel"):
    #: Absent (null) only for an optional open of a missing image.
    image_id: int | None


class ImageParams(_Params):
    image_id: int


class Empty(_Result):
    pass


class GetManifestParams(_Params):
    image_id: int
    #: False: return the manifest the reference names, even an index.
    resolve: bool = True
    #: Also return the manifest converted to OCI (Docker schema 2 only).
    convert_to_oci: bool = False


class GetManifestResult(_Result):
    #: The stored bytes, exactly (decode the string as UTF-8).
    manifest: str
    media_type: str
    digest: str
    #: Present when conversion was asked for and the manifest is not OCI.
    oci_manifest: str | None = None


class GetConfigResult(_Result):
    #: The stored config bytes, exactly.
    config: str
    digest: str
    media_type: str


class LayerDescription(_Result):
    digest: str
    diff_id: str
    size: int
    media_type: str


class GetLayerInfoResult(msgspec.Struct, rename="camel"):
    layers: list[LayerDescription]


class GetBlobParams(_Params):
    image_id: int
    digest: str
    #: Hash the blob while sending; a mismatch is reported on the error fd.
    verify: bool = False


class GetBlobResult(msgspec.Struct, rename="camel"):
    #: -1 when the source does not know it up front.
    size: int


class GetSplitFDStreamParams(_Params):
    image_id: int
    #: The layer's digest as the manifest lists it, or its diffID.
    digest: str
    #: How many content fds to send with this reply (0 .. MAX_FD_WINDOW).
    max_fds: int = DEFAULT_FD_WINDOW


class GetSplitFDStreamAnyParams(_Params):
    """GetSplitFDStream as the server decodes it: ours or the upstream form.

    Ours names an opened image and a layer digest (GetSplitFDStreamParams).
    The containers-storage pull request's form names a store layer by ID
    instead (``layerId``, optional ``parentId``); the server accepts either,
    telling them apart by ``layerId``.
    """

    image_id: int | None = None
    digest: str | None = None
    max_fds: int = DEFAULT_FD_WINDOW
    #: A containers-storage layer ID (upstream form).
    layer_id: str | None = None
    #: The layer's parent ID; only the layer's own parent is accepted.
    parent_id: str | None = None


class GetSplitFDStreamResult(msgspec.Struct, rename="camel"):
    #: Pass to GetSplitFDStreamFiles and CloseSplitFDStream.
    stream_id: int
    diff_id: str
    #: Bytes of the uncompressed tar the stream rebuilds.
    tar_size: int
    #: External files the stream refers to (indices 0 .. fileCount-1).
    file_count: int
    #: fds 1 .. filesIncluded of this reply are files 0 .. filesIncluded-1.
    files_included: int


class GetSplitFDStreamFilesParams(_Params):
    stream_id: int
    start: int
    count: int


class GetSplitFDStreamFilesResult(msgspec.Struct, rename="camel"):
    #: The reply's fds are files start .. start+count-1.
    start: int
    count: int


class StreamParams(_Params):
    stream_id: int


class BlobError(msgspec.Struct):
    """What GetBlob writes to its error fd when the transfer fails."""

    kind: str
    message: str


class GetImageParams(_Params):
    """The upstream pull request's GetImage: a store image by ID or name."""

    image_id: str


class GetImageResult(msgspec.Struct, rename="camel"):
    manifest: str
    config: str
    #: containers-storage layer IDs, top layer first (as upstream sends them).
    layer_digests: list[str]


class UpstreamSplitFDStreamResult(msgspec.Struct, rename="camel"):
    """GetSplitFDStream's result for the upstream form: ours plus its fields."""

    stream_id: int
    diff_id: str
    tar_size: int
    file_count: int
    files_included: int
    #: Upstream's names: the stream's size in bytes, and 1 + fileCount.
    stream_size: int
    total_fds: int = msgspec.field(name="totalFDs")
