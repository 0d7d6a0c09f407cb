"""Store checks made before any stage runs: a store URL that cannot work is one `PreflightError`
line naming the URL (never a credential), before anything is computed or written.

- any URL: its scheme is an installed fsspec protocol, and it holds no ``user:password@``;
- a local folder: it is a folder (or can be made one: its nearest existing parent is a writable
  folder); nothing is created;
- ``s3://bucket/prefix``: a bucket is named, the endpoint answers, the bucket exists and the
  credentials may read it (one ``HeadBucket`` request, with short timeouts and a single retry, with
  the options the store itself uses: `trecflow.store.Store.storage_options`).
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import Any

import fsspec

from trecflow.redact import redact

S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 10
S3_ATTEMPTS = 2


class PreflightError(ValueError):
    """A store that cannot be used; ``str(err)`` is one line naming its URL."""


def check_store(url: str, endpoint_url: str | None = None) -> None:
    """`PreflightError` when the store at ``url`` cannot be used (see the module docstring)."""
    plain = url.removeprefix("file://")
    if "://" not in plain:
        _check_folder(os.path.abspath(os.path.expanduser(plain)), url)
        return
    scheme = plain.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(scheme)
    except (ValueError, ImportError) as error:
        known = ", ".join(sorted(name for name in fsspec.available_protocols() if name.isalnum() and len(name) <= 5)[:12])
        reason = "unknown scheme" if isinstance(error, ValueError) else f"its package is not installed ({error})"
        raise PreflightError(f"store {redact(url)}: {reason} {scheme!r} (e.g. {known})") from None
    if "@" in plain.split("://", 1)[1].split("/", 1)[0]:
        raise PreflightError(f"store {redact(url)}: credentials in the URL are not read (and would be shown wherever the URL is): "
                             f"give them in the environment or TRECFLOW_STORE_OPTIONS")
    if scheme in ("s3", "s3a"):
        _check_bucket(url, endpoint_url)


def _check_folder(path: str, url: str) -> None:
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise PreflightError(f"store {url}: {path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PreflightError(f"store {url}: the folder {path} is not writable")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise PreflightError(f"store {url}: cannot create {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PreflightError(f"store {url}: cannot create {path}: {parent} is not writable")


@functools.cache
def _loader():
    """botocore's loader of service models, kept: the S3 model is read once per process."""
    import botocore.session

    return botocore.session.get_session().get_component("data_loader")


def _check_bucket(url: str, endpoint_url: str | None) -> None:
    """One HeadBucket with the store's own options (endpoint, key/secret/token, region, anon)."""
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    from trecflow.store import Store

    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        raise PreflightError(f"store {redact(url)}: no bucket named (s3://BUCKET/prefix)")
    options: dict[str, Any] = Store.storage_options(SimpleNamespace(url=url, endpoint_url=endpoint_url))  # as the store opens it
    client_kwargs = dict(options.get("client_kwargs") or {})
    endpoint = client_kwargs.get("endpoint_url") or options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S, retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"},
        **({"signature_version": UNSIGNED} if options.get("anon") else {}),
    )
    session = botocore.session.get_session()  # a fresh one: credentials are resolved anew
    session.register_component("data_loader", _loader())
    client = session.create_client(
        "s3", endpoint_url=endpoint, region_name=client_kwargs.get("region_name") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        aws_access_key_id=options.get("key"), aws_secret_access_key=options.get("secret"), aws_session_token=options.get("token"),
        config=config,
    )
    where = f"store {redact(url)}" + (f" (endpoint {redact(endpoint)})" if endpoint else "")
    try:
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        raise PreflightError(f"{where}: no S3 credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, "
                             f"or key/secret in TRECFLOW_STORE_OPTIONS)") from None
    except EndpointConnectionError:
        raise PreflightError(f"{where}: cannot connect to the S3 endpoint {redact(endpoint or 'of AWS')}") from None
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket") or status == 404:
            raise PreflightError(f"{where}: the bucket {bucket!r} does not exist") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            raise PreflightError(f"{where}: access to the bucket {bucket!r} denied (wrong credentials, or no permission)") from None
        raise PreflightError(f"{where}: HeadBucket {bucket!r} failed ({code or status})") from None
    except BotoCoreError as error:  # timeouts, a malformed endpoint URL, ...
        raise PreflightError(f"{where}: {type(error).__name__}: {str(error).splitlines()[0]}") from None
    finally:
        client.close()
