"""Models by name: ``hf-hub:ORG/NAME[@REVISION]`` and folders in the Hub's layout, resolved to local files.

``promptkd export CKPT --format hub --out DIR`` writes a run as a Hugging Face model repo (see
:mod:`promptkd.hub_export`): the promptkd files as they are, a ``config.json`` saying which file plays which part
(the checkpoint, the teacher's checkpoint, the stored teacher features) and a model card. Such a folder, or the same
repo named ``hf-hub:ORG/NAME`` and fetched through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``, revision
pinning), is accepted wherever a checkpoint, teacher or features file is. Only the path is resolved here: the files
are then read by the same loaders as any other and trusted by their own hashes (``tensors_sha256``,
``features_sha256``, the teacher identity), never by the name they came under.

Nothing here imports torch (argument checks call it); ``huggingface_hub`` is imported only for an ``hf-hub:`` name.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from promptkd.errors import PromptKDError

__all__ = [
    "HUB_CONFIG",
    "HUB_FORMAT",
    "HUB_VERSION",
    "PREFIX",
    "ROLES",
    "HubError",
    "HubName",
    "hub_cache_dir",
    "hub_folder_config",
    "hub_reachable",
    "in_hub_cache",
    "is_hub_name",
    "parse_hub_name",
    "resolve_file",
    "snapshot",
]

PREFIX = "hf-hub:"
HUB_FORMAT = "promptkd-hub"
HUB_VERSION = 1
HUB_CONFIG = "config.json"
#: the parts a Hub folder can hold, as its config.json's ``files`` names them, with the words a message uses
ROLES = {"checkpoint": "checkpoint", "teacher": "teacher checkpoint", "features": "stored teacher features"}
#: seconds to wait for the Hub's answer before using the cache (huggingface_hub waits 10 by default)
ETAG_TIMEOUT = 5.0

# Hub repo ids: ORG/NAME, each part letters, digits, '-', '_', '.', not starting or ending with '-' or '.'
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?"
_NAME = re.compile(rf"^{re.escape(PREFIX)}(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[^\s@]+))?$")


class HubError(PromptKDError, ValueError):
    """An ``hf-hub:`` name or Hub folder that cannot be resolved; the message says what to run."""


@dataclass(frozen=True)
class HubName:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")

    def download_command(self) -> str:
        """What to run on a connected machine to put this repo (at this revision) in the cache."""
        return f"hf download {self.repo_id}" + (f" --revision {self.revision}" if self.revision else "")


def is_hub_name(value: str) -> bool:
    return str(value).startswith(PREFIX)


def parse_hub_name(value: str) -> HubName:
    """``hf-hub:ORG/NAME[@REVISION]`` -> HubName; anything else that starts with ``hf-hub:`` is refused here."""
    match = _NAME.match(value.strip())
    if not match or ".." in match["repo"] or "--" in match["repo"]:
        raise HubError(
            f"{value!r} is not a Hub model name: write hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION (a branch, tag "
            "or commit), e.g. hf-hub:my-org/pkd-student@v1."
        )
    return HubName(match["repo"], match["revision"])


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "on", "true", "yes")


def hub_cache_dir() -> Path:
    """The Hub cache as huggingface_hub finds it, read now (not at its import): HF_HUB_CACHE, else HF_HOME/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def hub_reachable() -> bool:
    """Whether to ask the Hub at all: not with HF_HUB_OFFLINE set, nor when its host has no address (a DNS lookup
    answers at once offline; huggingface_hub alone would try the network and wait for its timeouts)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def in_hub_cache(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies in a snapshot of a Hub cache (``models--ORG--NAME/snapshots/<commit>/``): a downloaded
    repo, shared by every program on the machine and bound to its commit, which promptkd never writes into."""
    parts = Path(path).absolute().parts
    return any(a.startswith("models--") and b == "snapshots" for a, b in itertools.pairwise(parts))


def _cached_revisions(name: HubName, cache: Path) -> list[str]:
    """The refs (branch/tag -> commit) and commits of ``name`` that the cache holds, for the message."""
    folder = cache / ("models--" + name.repo_id.replace("/", "--"))
    refs = sorted(p for p in (folder / "refs").rglob("*") if p.is_file()) if (folder / "refs").is_dir() else []
    named = [f"{p.relative_to(folder / 'refs').as_posix()} -> {p.read_text().strip()[:12]}" for p in refs]
    commits = sorted(p.name for p in (folder / "snapshots").iterdir()) if (folder / "snapshots").is_dir() else []
    return named or [c[:12] for c in commits]


def _not_cached(name: HubName, error: Exception) -> HubError:
    cache = hub_cache_dir()
    cached = _cached_revisions(name, cache)
    forced = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    if "incomplete" in str(error).lower():
        what = f"{name}: its copy in the local Hub cache ({cache}) is incomplete"
    elif cached:
        what = (
            f"revision {name.revision or 'main'!r} of {name.repo_id} is not in the local Hub cache ({cache}; it "
            f"holds {', '.join(cached)})"
        )
    else:
        what = f"{name} is not in the local Hub cache ({cache})"
    why = "HF_HUB_OFFLINE is set" if forced else "the Hub cannot be reached from this machine"
    return HubError(
        f"{what}, and {why}. On a connected machine run `{name.download_command()}` and copy its Hub cache "
        f"(~/.cache/huggingface/hub, or HF_HUB_CACHE) to {cache}"
        + ("; or, where the Hub can be reached, run with HF_HUB_OFFLINE=0." if forced else ".")
    )


def snapshot(name: HubName) -> Path:
    """The local folder of ``name`` at its revision: from the cache when offline (HF_HUB_OFFLINE or no network),
    else downloaded (or checked for updates) through huggingface_hub's ``snapshot_download``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from promptkd._version import __version__

    offline = not hub_reachable()
    try:
        folder = snapshot_download(
            name.repo_id,
            revision=name.revision,
            cache_dir=str(hub_cache_dir()),
            local_files_only=offline,
            library_name="promptkd",
            library_version=__version__,
            etag_timeout=ETAG_TIMEOUT,
        )
    except RevisionNotFoundError:
        raise HubError(
            f"{name}: revision {name.revision!r} does not exist in {name.repo_id} on the Hub; give a branch, tag or "
            f"commit the repo has (see https://huggingface.co/{name.repo_id}/commits)."
        ) from None
    except GatedRepoError:
        raise HubError(f"{name}: a gated repo; accept its terms on the Hub and log in (`hf auth login`).") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{name}: no such model repo on the Hub, or it is private (log in with `hf auth login`)."
        ) from None
    except LocalEntryNotFoundError as error:
        raise _not_cached(name, error) from None
    except (OSError, ValueError) as error:  # HTTP errors, a Hub that went away mid-way, a bad revision string
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HubError(f"{name}: could not be fetched from the Hub ({first}).") from None
    return Path(folder)


def hub_folder_config(folder: Path) -> dict[str, Any] | None:
    """The promptkd config of a Hub-layout folder; None when the folder is not one (no promptkd config.json)."""
    path = folder / HUB_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HubError(f"{path}: not valid JSON ({error}); the folder's copy is damaged, fetch it again.") from None
    return config if isinstance(config, dict) and config.get("format") == HUB_FORMAT else None


def _role_file(folder: Path, config: dict[str, Any], role: str, shown: str) -> Path:
    files = config.get("files") if isinstance(config.get("files"), dict) else {}
    name = files.get(role)
    if not name:
        held = ", ".join(ROLES.get(r, r) for r in sorted(files)) or "nothing"
        raise HubError(f"{shown} holds no {ROLES[role]} (it holds: {held}).")
    path = folder / str(name)
    pair = path.with_suffix(".json")
    if path.parent != folder or not path.is_file() or not pair.is_file():
        raise HubError(
            f"{shown}: its {ROLES[role]} {name} (with {pair.name}) is listed in {HUB_CONFIG} but missing; the copy "
            "is incomplete: fetch or export it again."
        )
    return path


def resolve_file(value: str, role: str = "checkpoint") -> str:
    """The local file ``value`` means for ``role`` (one of :data:`ROLES`): an ``hf-hub:`` name is fetched and a
    Hub-layout folder opened; any other value is returned unchanged (the caller checks it as a path)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, not {role!r}")
    if is_hub_name(value):
        name = parse_hub_name(value)
        folder, shown = snapshot(name), str(name)
    else:
        folder, shown = Path(value).expanduser(), value
        if not folder.is_dir():
            return value
    config = hub_folder_config(folder)
    if config is None:
        if not is_hub_name(value):
            return value  # a plain folder: the caller says what a checkpoint is
        raise HubError(
            f"{shown} is not a promptkd model (its files hold no {HUB_CONFIG} of format {HUB_FORMAT}); export one "
            "with `promptkd export CKPT --format hub --out DIR`. An open_clip backbone goes to --model hf-hub:..."
        )
    return str(_role_file(folder, config, role, shown))
