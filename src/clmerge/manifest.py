"""manifest.json of a store key: sealed with its own sha256 and validated against a schema on every read.

The seal is the sha256 of the manifest's canonical JSON (sorted keys, no spaces) without the seal itself,
so a truncated or bit-flipped manifest is never trusted: it fails to parse, fails the schema, or fails
the seal, and the error names the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from clmerge.errors import UserError

SCHEMA_VERSION = 2
SEAL = "manifest_sha256"
KINDS = ("finetune", "merge")
STATUSES = ("complete",)
# A file named by a manifest: a plain name inside the key directory (no separators, no leading dot).
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.safetensors")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REQUIRED: dict[str, type] = {"schema_version": int, "clmerge_version": str, "kind": str, "key": str, "files": dict}
_OPTIONAL: dict[str, type] = {"status": str, "config": dict, "benchmark": dict, "finetune_key": str, "method": str,
                              "params": dict}


def canonical_sha256(payload: dict[str, Any]) -> str:
    """sha256 of `payload` as canonical JSON."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def sealed_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as the bytes of manifest.json, with its seal."""
    body = {key: value for key, value in manifest.items() if key != SEAL}
    return json.dumps({**body, SEAL: canonical_sha256(body)}, indent=2).encode()


def read_manifest(file: Path) -> dict[str, Any]:
    """Parse, unseal and validate manifest.json; any damage is a one-line UserError naming `file`."""
    fix = f"delete {file.parent} and rerun the command that wrote it"
    try:
        manifest = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise UserError(f"corrupt manifest {file} ({reason}); {fix}") from None
    if not isinstance(manifest, dict):
        raise UserError(f"corrupt manifest {file} (not a JSON object); {fix}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{file} has schema version {manifest.get('schema_version')}, expected {SCHEMA_VERSION} "
                        f"(written by another clmerge version); {fix}")
    seal = manifest.pop(SEAL, None)
    if seal != canonical_sha256(manifest):
        raise UserError(f"corrupt manifest {file} (its content does not match its sha256); {fix}")
    problem = schema_problem(manifest)
    if problem:
        raise UserError(f"invalid manifest {file} ({problem}); {fix}")
    return manifest


def schema_problem(manifest: dict[str, Any]) -> str:
    """What makes `manifest` violate the schema, or "" when it is valid."""
    for key, kind in _REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            return f"'{key}' must be a {kind.__name__}"
    for key, kind in _OPTIONAL.items():
        if key in manifest and not isinstance(manifest[key], kind):
            return f"'{key}' must be a {kind.__name__}"
    if manifest["kind"] not in KINDS:
        return f"'kind' must be one of {', '.join(KINDS)}"
    if "status" in manifest and manifest["status"] not in STATUSES:
        return f"'status' must be one of {', '.join(STATUSES)}"
    for name, record in manifest["files"].items():
        if not FILE_NAME.fullmatch(name):
            return f"file name '{name}' is not a plain .safetensors name in the key directory"
        if not isinstance(record, dict) or not _HEX64.fullmatch(str(record.get("sha256", ""))):
            return f"the record of {name} has no sha256"
    return ""
