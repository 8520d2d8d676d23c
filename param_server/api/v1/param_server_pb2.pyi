from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape", "stacked")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    STACKED_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    stacked: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., stacked: _Optional[bool] = ...) -> None: ...

class ShardEntry(_message.Message):
    __slots__ = ("key", "digest", "size", "tensors")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    key: str
    digest: str
    size: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    def __init__(self, key: _Optional[str] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ...) -> None: ...

class FileEntry(_message.Message):
    __slots__ = ("name", "digest", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    digest: str
    size: int
    def __init__(self, name: _Optional[str] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("model", "version", "parent", "created_at", "author", "message", "metadata_json", "shards", "files", "changed", "next_page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    parent: int
    created_at: str
    author: str
    message: str
    metadata_json: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardEntry]
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    changed: _containers.RepeatedScalarFieldContainer[str]
    next_page_token: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., parent: _Optional[int] = ..., created_at: _Optional[str] = ..., author: _Optional[str] = ..., message: _Optional[str] = ..., metadata_json: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardEntry, _Mapping]]] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., changed: _Optional[_Iterable[str]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "parent", "created_at", "author", "message", "pinned", "head", "num_changed")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    NUM_CHANGED_FIELD_NUMBER: _ClassVar[int]
    version: int
    parent: int
    created_at: str
    author: str
    message: str
    pinned: bool
    head: bool
    num_changed: int
    def __init__(self, version: _Optional[int] = ..., parent: _Optional[int] = ..., created_at: _Optional[str] = ..., author: _Optional[str] = ..., message: _Optional[str] = ..., pinned: _Optional[bool] = ..., head: _Optional[bool] = ..., num_changed: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[str]] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ("model", "version", "page_size", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    page_size: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("model", "head", "versions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    head: int
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    def __init__(self, model: _Optional[str] = ..., head: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ...) -> None: ...

class FetchShardsRequest(_message.Message):
    __slots__ = ("model", "version", "shard_keys", "file_names", "width")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARD_KEYS_FIELD_NUMBER: _ClassVar[int]
    FILE_NAMES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    shard_keys: _containers.RepeatedScalarFieldContainer[str]
    file_names: _containers.RepeatedScalarFieldContainer[str]
    width: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., shard_keys: _Optional[_Iterable[str]] = ..., file_names: _Optional[_Iterable[str]] = ..., width: _Optional[str] = ...) -> None: ...

class GetVariantsRequest(_message.Message):
    __slots__ = ("model", "version", "shard_keys", "width")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARD_KEYS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    shard_keys: _containers.RepeatedScalarFieldContainer[str]
    width: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., shard_keys: _Optional[_Iterable[str]] = ..., width: _Optional[str] = ...) -> None: ...

class VariantEntry(_message.Message):
    __slots__ = ("key", "digest", "size", "source_digest")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    key: str
    digest: str
    size: int
    source_digest: str
    def __init__(self, key: _Optional[str] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ..., source_digest: _Optional[str] = ...) -> None: ...

class GetVariantsResponse(_message.Message):
    __slots__ = ("version", "variants")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    variants: _containers.RepeatedCompositeFieldContainer[VariantEntry]
    def __init__(self, version: _Optional[int] = ..., variants: _Optional[_Iterable[_Union[VariantEntry, _Mapping]]] = ...) -> None: ...

class BlobHeader(_message.Message):
    __slots__ = ("key", "digest", "size", "is_file", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    IS_FILE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: str
    digest: str
    size: int
    is_file: bool
    version: int
    def __init__(self, key: _Optional[str] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ..., is_file: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class FetchChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: BlobHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[BlobHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CommitHeader(_message.Message):
    __slots__ = ("model", "parent_version", "author", "message", "metadata_json", "allow_schema_change", "remove_shards")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    ALLOW_SCHEMA_CHANGE_FIELD_NUMBER: _ClassVar[int]
    REMOVE_SHARDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    parent_version: int
    author: str
    message: str
    metadata_json: str
    allow_schema_change: bool
    remove_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., parent_version: _Optional[int] = ..., author: _Optional[str] = ..., message: _Optional[str] = ..., metadata_json: _Optional[str] = ..., allow_schema_change: _Optional[bool] = ..., remove_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class UploadBegin(_message.Message):
    __slots__ = ("key", "size", "digest", "is_file")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    IS_FILE_FIELD_NUMBER: _ClassVar[int]
    key: str
    size: int
    digest: str
    is_file: bool
    def __init__(self, key: _Optional[str] = ..., size: _Optional[int] = ..., digest: _Optional[str] = ..., is_file: _Optional[bool] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("header", "begin", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: CommitHeader
    begin: UploadBegin
    data: bytes
    def __init__(self, header: _Optional[_Union[CommitHeader, _Mapping]] = ..., begin: _Optional[_Union[UploadBegin, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("manifest", "blobs_written", "bytes_written")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    BLOBS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    manifest: Manifest
    blobs_written: int
    bytes_written: int
    def __init__(self, manifest: _Optional[_Union[Manifest, _Mapping]] = ..., blobs_written: _Optional[int] = ..., bytes_written: _Optional[int] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("model", "version", "author", "message")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    author: str
    message: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., author: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("previous_head", "head")
    PREVIOUS_HEAD_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    previous_head: int
    head: int
    def __init__(self, previous_head: _Optional[int] = ..., head: _Optional[int] = ...) -> None: ...

class SetPinRequest(_message.Message):
    __slots__ = ("model", "version", "pinned")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    pinned: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., pinned: _Optional[bool] = ...) -> None: ...

class SetPinResponse(_message.Message):
    __slots__ = ("pinned",)
    PINNED_FIELD_NUMBER: _ClassVar[int]
    pinned: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, pinned: _Optional[_Iterable[int]] = ...) -> None: ...

class CollectGarbageRequest(_message.Message):
    __slots__ = ("keep_last", "dry_run")
    KEEP_LAST_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    keep_last: int
    dry_run: bool
    def __init__(self, keep_last: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class CollectGarbageResponse(_message.Message):
    __slots__ = ("dropped_versions", "blobs_deleted", "bytes_freed")
    DROPPED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    BLOBS_DELETED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    dropped_versions: _containers.RepeatedScalarFieldContainer[str]
    blobs_deleted: int
    bytes_freed: int
    def __init__(self, dropped_versions: _Optional[_Iterable[str]] = ..., blobs_deleted: _Optional[int] = ..., bytes_freed: _Optional[int] = ...) -> None: ...

class GetStoreInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StoreInfo(_message.Message):
    __slots__ = ("store_id", "blob_root", "hostname", "announce_url")
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    BLOB_ROOT_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    ANNOUNCE_URL_FIELD_NUMBER: _ClassVar[int]
    store_id: str
    blob_root: str
    hostname: str
    announce_url: str
    def __init__(self, store_id: _Optional[str] = ..., blob_root: _Optional[str] = ..., hostname: _Optional[str] = ..., announce_url: _Optional[str] = ...) -> None: ...
