"""Schemathesis hooks for Keyward.

The import endpoint's bodies are JSON Lines and CSV text, which Schemathesis cannot serialize by itself.

Two rules of the server that no JSON Schema states, applied to generated requests before they are sent
(each keeps a valid case valid and an invalid one invalid; with the two checks turned off for one
operation each in scripts/schemathesis.toml, they are the run's only exceptions):

- An integer field takes an integer spelled as one: JSON Schema 2020-12 counts `2.0` as an integer,
  Keyward's JSON reader refuses it (422 `invalid_request`), as it refuses `1e9`. Whole floats are sent
  as integers.
- `expires_at` must lie in the future, which a schema cannot say (`format: date-time` only): a
  generated date-time in the past is moved to a year from now.
- `organization_id` (a body field or the import's query parameter) must name an organization that
  exists (else 422 `validation_failed`), which a schema cannot say either: a generated UUID is replaced
  by the seeded organization's id (KEYWARD_SCHEMATHESIS_ORG, set by scripts/schemathesis.sh).
- A usage report's `key_id` must name a key that exists (else 422 `validation_failed` for the batch),
  which a schema cannot say: a generated UUID is replaced by the admin key's id
  (KEYWARD_SCHEMATHESIS_KEY_ID, set by scripts/schemathesis.sh).
- A usage report's `timestamp` must not lie more than 5 minutes ahead (a report is about a request
  that happened), which a schema cannot say: a generated date-time in the future is sent as now.
- A CSV import must open with a header line naming its columns, one of them `key` or `key_sha256`
  (else 422 for the whole file), which a schema of a text body cannot say: generated CSV text gets
  the header `key_sha256` before it, so its lines are rows (each refused or imported, 200).
"""

import datetime
import os
import uuid

import schemathesis


@schemathesis.serializer("application/x-ndjson", "text/csv")
def text_body(ctx, value):
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def _whole_floats_as_integers(value):
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, list):
        return [_whole_floats_as_integers(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole_floats_as_integers(v) for k, v in value.items()}
    return value


def _instant(value):
    """An RFC 3339 date-time with an offset, as an aware datetime; None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        at = datetime.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None else None


def _utc_text(at):
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def _in_the_future(value):
    """`value` if it is not an RFC 3339 date-time in the past, else one a year from now."""
    at, now = _instant(value), datetime.datetime.now(datetime.timezone.utc)
    if at is None or at > now + datetime.timedelta(minutes=1):
        return value
    return _utc_text(now + datetime.timedelta(days=365))


def _not_ahead(value):
    """`value` if it is not an RFC 3339 date-time in the future, else now."""
    at, now = _instant(value), datetime.datetime.now(datetime.timezone.utc)
    if at is None or at <= now:
        return value
    return _utc_text(now)


def _existing(value, variable):
    """The id in `variable` for any UUID; anything else (an invalid case) as it is."""
    if not isinstance(value, str) or variable not in os.environ:
        return value
    try:
        uuid.UUID(value)
    except ValueError:
        return value
    return os.environ[variable]


def _existing_organization(value):
    return _existing(value, "KEYWARD_SCHEMATHESIS_ORG")


def _existing_keys(report):
    if not isinstance(report, dict):
        return
    if "key_id" in report:
        report["key_id"] = _existing(report["key_id"], "KEYWARD_SCHEMATHESIS_KEY_ID")
    if "timestamp" in report:
        report["timestamp"] = _not_ahead(report["timestamp"])


def _is_csv_import(case):
    if case.operation.path != "/v1/keys/import":
        return False
    chosen = (case.query or {}).get("format") if isinstance(case.query, dict) else None
    if isinstance(chosen, str):
        return chosen.lower() == "csv"
    return (case.media_type or "").split(";")[0].strip().lower() in ("text/csv", "application/csv")


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if isinstance(case.query, dict) and "organization_id" in case.query:
        case.query["organization_id"] = _existing_organization(case.query["organization_id"])
    if _is_csv_import(case) and isinstance(case.body, str):
        case.body = "key_sha256\n" + case.body
    if not isinstance(case.body, (dict, list)):
        return
    case.body = _whole_floats_as_integers(case.body)
    if isinstance(case.body, dict):
        if "organization_id" in case.body:
            case.body["organization_id"] = _existing_organization(case.body["organization_id"])
        if case.operation.path == "/v1/usage":
            _existing_keys(case.body)
            for report in case.body.get("events", []) if isinstance(case.body.get("events"), list) else []:
                _existing_keys(report)
        if case.operation.path in ("/v1/keys", "/v1/keys/{id}") and "expires_at" in case.body:
            case.body["expires_at"] = _in_the_future(case.body["expires_at"])
