"""Credentials are never shown nor recorded: `redact` masks them in any text before it goes to a
terminal, a log, MLflow or Prefect.

What it masks (as ``***``): the password of a URL's user information
(``postgresql://user:***@db/mlflow``, ``http://user:***@host:9000``) and the values of query
parameters that carry credentials (``?password=``, ``token=``, ``X-Amz-Signature=``,
``X-Amz-Credential=``, ``X-Amz-Security-Token=``...) and AWS access key IDs wherever they appear
(``AKIA``/``ASIA`` and 16 more capitals or digits: an ``s3://KEY:SECRET@bucket`` URL's user name is
one). Other user names, hosts and paths stay, so a redacted URL still says where it points. Storage options under a recipe's ``storage_options`` are
masked by `trecflow.recipe.Recipe.redacted_dump`; credentials given as environment variables
(``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_TOKEN``) are never copied into anything recorded.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import urlsplit

MASK = "***"
# scheme://user:password@ -- the password runs up to the last "@" before the host (it may hold "@"
# only percent-encoded, as RFC 3986 requires)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@:'\"<>`]*:)(?P<password>[^\s/@'\"<>`]+)(?=@)")
_SECRET_QUERY = re.compile(
    r"(?P<head>[?&;](?:password|passwd|pwd|token|access_token|auth|secret|signature|sig|"
    r"x-amz-signature|x-amz-credential|x-amz-security-token|awsaccesskeyid)=)(?P<value>[^&\s'\"<>`#]+)",
    re.IGNORECASE,
)


_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")


def redact(text: str) -> str:
    """``text`` with every URL password, credential query value and AWS access key ID replaced by
    ``***``."""
    if "KIA" in text or "SIA" in text:
        text = _AWS_KEY_ID.sub(MASK, text)
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda match: match["head"] + MASK, text)
    return _SECRET_QUERY.sub(lambda match: match["head"] + MASK, text)


def redact_value(value: Any) -> Any:
    """`redact` applied to every string inside ``value`` (dicts, lists and tuples rebuilt)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(item) for item in value)
    return value


def redact_error(error: BaseException) -> BaseException:
    """``error`` (and the exceptions chained to it) with credentials masked in place: its
    message, and the strings its attributes hold (``MlflowException.message``, botocore's
    ``kwargs``), since a failed run's exception is logged and pickled (Prefect persists it as the
    run's result). Its type stays, so handlers still tell bad input from a failure; returns it."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        try:
            current.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in current.args)
            for name, value in list(getattr(current, "__dict__", {}).items()):
                if isinstance(value, (str, dict, list, tuple)):
                    masked = redact_value(value)
                    if masked != value:
                        setattr(current, name, masked)
            if isinstance(current, OSError):
                for name in ("strerror", "filename", "filename2"):
                    value = getattr(current, name, None)
                    if isinstance(value, str):
                        setattr(current, name, redact(value))
        except (AttributeError, TypeError):  # an exception type with read-only attributes: left as it is
            pass
        current = current.__cause__ or current.__context__
    return error


def has_password(url: str | None) -> bool:
    """True when ``url`` carries a password in its user information."""
    try:
        return bool(url) and urlsplit(url).password is not None
    except ValueError:  # not a URL urlsplit can read: nothing to say
        return False


_installed = False


def install_log_redaction() -> None:
    """Mask credentials in every log record this process creates, whatever logger or handler it
    goes to (Prefect's console and API handlers, MLflow's, Ray's): the record's message, and the
    message of the exception it carries (in place), pass through `redact` when the record is
    made. Idempotent; costs one string check per record."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.exc_info and record.exc_info[1] is not None:
            redact_error(record.exc_info[1])
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: logging reports it itself
            return record
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return record

    logging.setLogRecordFactory(make)
    _installed = True
