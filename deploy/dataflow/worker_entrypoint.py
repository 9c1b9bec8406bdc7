"""Entry point of the Dataflow worker image: secrets from Secret Manager, then Beam's boot.

Why: the pipeline reads its secrets (EVENTHUB_CONNECTION_STRING, SYNAPSE_USER/SYNAPSE_PASSWORD,
AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET, AZURE_STORAGE_CONNECTION_STRING) only from
environment variables, never from flags, because Dataflow shows every pipeline option and template
parameter in the console and the job's metadata. Dataflow cannot set environment variables on
workers, so this wrapper reads them from Secret Manager with the worker service account (it needs
roles/secretmanager.secretAccessor on those secrets) and then replaces itself with Beam's boot
program, passing on the arguments Dataflow gave the container.

``BMS_SECRETS``, set when the image is built, names the secret versions, separated by spaces or
commas: ``EVENTHUB_CONNECTION_STRING=projects/P/secrets/eventhub-connection/versions/latest``.
Unset or empty, nothing is read: the pipeline then relies on DefaultAzureCredential alone.
"""

from __future__ import annotations

import os
import re
import sys

BOOT = "/opt/apache/beam/boot"
SECRETS_ENV = "BMS_SECRETS"
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VERSION = re.compile(r"projects/[^/\s]+/secrets/[^/\s]+/versions/[^/\s]+")


def secret_versions(spec: str) -> dict[str, str]:
    """``{VARIABLE: secret version name}`` from ``BMS_SECRETS``; a malformed entry is an error,
    so that a typo stops the worker at start with its reason instead of as a later auth failure."""
    versions: dict[str, str] = {}
    for entry in spec.replace(",", " ").split():
        variable, _, name = entry.partition("=")
        if not _VARIABLE.fullmatch(variable) or not _VERSION.fullmatch(name):
            raise ValueError(
                f"{SECRETS_ENV} entry {entry!r} is not VARIABLE=projects/P/secrets/S/versions/V"
            )
        versions[variable] = name
    return versions


def load_secrets(versions: dict[str, str]) -> dict[str, str]:
    """The secrets' values, read with the worker's Google credentials."""
    if not versions:
        return {}
    from google.cloud import secretmanager

    client = secretmanager.SecretManagerServiceClient()
    return {
        variable: client.access_secret_version(name=name).payload.data.decode("utf-8")
        for variable, name in versions.items()
    }


def main(argv: list[str]) -> None:
    """Exports the secrets and execs Beam's boot with ``argv`` (never returns)."""
    os.environ.update(load_secrets(secret_versions(os.environ.get(SECRETS_ENV, ""))))
    os.execv(BOOT, [BOOT, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
