"""What the Azure adapters share: optional imports with a one-line install hint, and credentials.

The Azure libraries are optional extras, so nothing here imports them at module level:
``import pipeline`` works without them, and the first use of an Azure adapter says what to install.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

from pipeline.errors import UsageError


def import_extra(module: str, extra: str) -> ModuleType:
    """Imports an optional dependency, or fails with one line naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise UsageError(
            f"{module} is not installed ({error}); install it with: "
            f"pip install -e '.[{extra}]' in the bms checkout"
        ) from None


def default_credential() -> Any:
    """azure-identity's DefaultAzureCredential: environment (service principal), workload or
    managed identity, then the Azure CLI login, in that order."""
    identity = import_extra("azure.identity", "azure")
    return identity.DefaultAzureCredential(exclude_interactive_browser_credential=True)


def is_credential_error(error: BaseException) -> bool:
    """True when no Azure credential could be found or the service refused it."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"CredentialUnavailableError", "ClientAuthenticationError"}) or (
        "AuthenticationError" in names
    )


def connection_string_settings(connection_string: str) -> dict[str, str]:
    """``Key=Value;...`` settings (Event Hubs and ODBC connection strings), keys lower-cased."""
    settings = {}
    for part in connection_string.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            settings[key.strip().lower()] = value.strip()
    return settings


#: The storage account of ``blob:CONTAINER`` locations (checkpoints, their lease, staging).
STORAGE_CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"


def storage_connection_string(location: str, what: str = "checkpoints") -> str:
    """The connection string a ``blob:CONTAINER`` location needs, or one ValueError line."""
    connection_string = os.environ.get(STORAGE_CONNECTION_STRING_ENV)
    if not connection_string:
        raise ValueError(
            f"{what} {location!r} need {STORAGE_CONNECTION_STRING_ENV} set to the storage "
            "account's connection string, or give the container's https:// URL to sign in "
            "with DefaultAzureCredential"
        )
    return connection_string
