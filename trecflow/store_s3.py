"""How the store talks to S3: botocore's and s3fs's retry settings (`S3_OPTIONS`, `S3FS_ROUNDS`)
and `RetryingS3FileSystem`, which turns a request that failed after every retry into one
`trecflow.store.StoreUnavailable` line. Imported only for ``s3://`` stores (s3fs is slow to import).
"""

from __future__ import annotations

from typing import Any

import s3fs
from botocore.exceptions import BotoCoreError, ClientError

from trecflow.settings import S3_MAX_ATTEMPTS, S3_RETRY_MODE
from trecflow.store import StoreUnavailable

# botocore's retries on every S3 request (why each value: docs/cluster.md, "An object store that
# throttles or fails"): "standard" mode retries 500/502/503/504, throttling (SlowDown) and lost
# connections with jittered exponential backoff and a client-wide retry quota; 5 attempts ride out
# a burst of about 15 s. A short connect timeout (an in-region endpoint answers in milliseconds), a
# read timeout long enough for a loaded server to answer a multipart part without a spurious retry.
S3_OPTIONS: dict[str, Any] = {
    "config_kwargs": {"retries": {"mode": S3_RETRY_MODE, "total_max_attempts": S3_MAX_ATTEMPTS}, "connect_timeout": 10, "read_timeout": 60},
}
# s3fs's own retry loop (around botocore's): reads a body cut short again (twice at most) and re-runs
# a call that botocore gave up on with SlowDown or a lost connection; 3 rounds (s3fs's default is 5,
# which with botocore's 5 attempts makes 25 requests per failing call).
S3FS_ROUNDS = 3
WRITES = {"put_object", "upload_part", "upload_part_copy", "create_multipart_upload", "complete_multipart_upload", "copy_object"}
READS = {"get_object", "head_object", "list_objects_v2", "list_objects", "head_bucket", "get_object_tagging"}


class RetryingS3FileSystem(s3fs.S3FileSystem):
    """s3fs with `S3FS_ROUNDS` rounds of its own retries, and a request that fails after all of
    them (and botocore's) raised as `StoreUnavailable`. 4xx answers keep s3fs's errors
    (``FileNotFoundError``, ``PermissionError``...)."""

    retries = S3FS_ROUNDS

    def __init__(self, *args, **kwargs):
        # No listing cache, whatever TRECFLOW_STORE_OPTIONS says: s3fs keeps one per instance, and
        # fsspec keeps one instance per set of options for the life of the process; once a folder
        # had been listed, `ls`, `glob` and `exists` answered from that memory, blind to what other
        # processes (Ray workers, another driver, a rerun with other options) wrote or removed since:
        # a rerun "kept" a part that was gone and read it into a 404. Every listing asks S3.
        super().__init__(*args, **{**kwargs, "use_listings_cache": False})

    async def _call_s3(self, method, *akwarglist, **kwargs):
        try:
            return await super()._call_s3(method, *akwarglist, **kwargs)
        except Exception as error:
            unavailable = unavailable_error(error, method, kwargs, self.retries)
            if unavailable is None:
                raise
            raise unavailable from error


def unavailable_error(error: BaseException, method: str, kwargs: dict[str, Any], rounds: int) -> StoreUnavailable | None:
    """``error`` (from s3fs's call of ``method``) as a `StoreUnavailable` if it means the store did
    not answer usefully after its retries: a 5xx or throttling answer, or no answer; else None."""
    cause = error if isinstance(error, (ClientError, BotoCoreError)) else error.__cause__ or error
    url = "s3://" + "/".join(part for part in (kwargs.get("Bucket"), kwargs.get("Key") or kwargs.get("Prefix")) if part)
    operation = "write" if method in WRITES else "read" if method in READS else "delete" if method.startswith("delete") else method.replace("_", " ")
    if isinstance(cause, ClientError):
        response = cause.response
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = response.get("Error", {}).get("Code", "")
        if status < 500 and code not in ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"):
            return None
        attempts = (response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1) * (rounds if code == "SlowDown" else 1)
        answer = f"{status} {code}" if code and code != str(status) else f"HTTP {status}"
        return StoreUnavailable(f"{url}: {operation} failed after {attempts} attempts: {answer}")
    if isinstance(cause, (BotoCoreError, ConnectionError, TimeoutError)):  # no answer at all
        return StoreUnavailable(f"{url}: {operation} failed after its retries: {type(cause).__name__}: {cause}".splitlines()[0])
    return None


