"""Schemathesis hooks of run.sh (loaded through SCHEMATHESIS_HOOKS).

POST /v1/vms makes a Unix socket at the body's `unix` path (or at
`<uds_path>_<port>`). Whether the daemon can is up to the file system, not
to the document: a generated path may name a directory nobody can write
to, or be longer than a socket address holds once encoded. So before a
request is sent, a non-empty `unix` or `uds_path` string is replaced by a
short relative path derived from it (the daemon's working directory is the
run's scratch directory). Other values (null, an empty string, a number:
the invalid ones) are sent as generated, and Schemathesis re-checks the
edited case against the schema, so a valid case stays valid and an invalid
one invalid.
"""

import hashlib

import schemathesis

SOCKET_FIELDS = (("unix", ".sock"), ("uds_path", ".vsock"))


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.operation.method.upper() != "POST" or case.operation.path != "/v1/vms":
        return
    if not isinstance(case.body, dict):
        return
    for field, suffix in SOCKET_FIELDS:
        value = case.body.get(field)
        if isinstance(value, str) and value:
            digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:12]
            case.body[field] = f"{field}-{digest}{suffix}"
