"""Checks of what a run needs outside itself -- logging integrations, the Hugging Face Hub -- made at start-up.

Without them the HF Trainer finds out at construction or at the first push, after the model has loaded and the output
folder has been written: a missing `tensorboard` is a 28-line traceback, `push_to_hub` offline a double one. Each
check here is one line naming the key and the fix, before anything is loaded or written.
"""

from __future__ import annotations

import os

from .errors import SfnError

# report_to name -> the package to install (where it is not the name itself)
PACKAGES = {"tensorboard": "tensorboard", "azure_ml": "azureml-core", "comet_ml": "comet_ml", "neptune": "neptune",
            "clearml": "clearml", "dagshub": "dagshub", "flyte": "flytekit", "dvclive": "dvclive",
            "codecarbon": "codecarbon", "mlflow": "mlflow", "wandb": "wandb", "swanlab": "swanlab",
            "trackio": "trackio", "kubeflow": "kubeflow"}


def report_to_names(training_args) -> list[str]:
    value = training_args.report_to
    names = [value] if isinstance(value, str) else list(value or [])
    return [n for n in names if n not in ("none", "all")]


def check_report_to(training_args) -> None:
    """Every integration `report_to` names must be importable here (transformers' own availability test)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    for name in report_to_names(training_args):
        if name not in INTEGRATION_TO_CALLBACK:
            raise SfnError(f"report_to {name!r} is not an integration transformers knows: use one of "
                           f"{', '.join(INTEGRATION_TO_CALLBACK)} or none.")
        if name not in available:
            package = PACKAGES.get(name, name)
            raise SfnError(f"report_to {name} needs the {package} package, which is not installed here: "
                           f"pip install {package}, or set `report_to: none`.")


def check_hub(training_args) -> None:
    """`push_to_hub` needs the hub and a token that it accepts: asked once, now."""
    if not training_args.push_to_hub:
        return
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise SfnError("push_to_hub is set but HF_HUB_OFFLINE=1 keeps this process off the hub: unset "
                       "HF_HUB_OFFLINE, or set `push_to_hub: false` and upload the output folder later.")
    from huggingface_hub import whoami

    try:
        whoami(token=training_args.hub_token)
    except Exception as exc:  # noqa: BLE001 - unreachable, refused or no token: all mean the push would fail
        raise SfnError(f"push_to_hub is set but the hub did not accept this process ({type(exc).__name__}: "
                       f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else 'no detail'}): log in with "
                       "`hf auth login` (or pass hub_token), check the network, or set `push_to_hub: false`.") from None


def check_outside_needs(training_args) -> None:
    check_report_to(training_args)
    check_hub(training_args)


def _looks_like_path(name: str) -> bool:
    """A name that means a folder: starts with . / ~, has more than one slash, or starts in an existing local folder
    (`lab/bse` beside a `lab/` folder). A hub id is `org/name` (or a bare legacy name)."""
    from pathlib import Path

    first = name.split("/", 1)[0]
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")
            or ("/" in name and Path(first).is_dir()))


def check_model_source(name: str, key: str = "model_name_or_path", revision: str | None = None) -> None:
    """Fail at once, in one line, where loading `name` could only fail after the hub's retries: a path-looking name
    that does not exist, or a hub id that is not in the local cache while the hub is out of reach (HF_HUB_OFFLINE=1,
    or no network). A local folder, a cached hub id and a reachable hub pass."""
    from pathlib import Path

    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise SfnError(f"{key} {name} is a file: pass the checkpoint folder that holds it.")
    if _looks_like_path(name):
        from .arguments import did_you_mean

        parent = path.parent if path.parent.is_dir() else None
        hint = did_you_mean([path.name], [p.name for p in parent.iterdir() if p.is_dir()]) if parent else ""
        raise SfnError(f"{key} {name} does not exist{hint}: pass an existing checkpoint folder (relative paths start "
                       f"from {Path.cwd()}).")
    from huggingface_hub import model_info, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return  # in the hub cache: loads without the network
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise SfnError(f"{key} {name} is neither a local folder nor in the hub cache, and HF_HUB_OFFLINE=1 keeps the "
                       "hub out of reach: pass a local checkpoint folder, or download it first (`hf download "
                       f"{name}`) where the hub is reachable.")
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        model_info(name, revision=revision, timeout=10)
    except GatedRepoError:
        return  # the hub answered; access is the loader's business (a token may come from elsewhere)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        what = " revision" if isinstance(exc, RevisionNotFoundError) else ""
        raise SfnError(f"{key} {name} is not a local folder and the hub has no such model{what}: check the spelling, "
                       "or pass a local checkpoint folder.") from None
    except HfHubHTTPError:
        return  # the hub answered otherwise: the loader says what it means
    except Exception as exc:  # noqa: BLE001 - no answer at all: a connection error or a timeout
        raise SfnError(f"{key} {name} is not a local folder and the hub cannot be reached ({type(exc).__name__}): "
                       "pass a local checkpoint folder, or set HF_HUB_OFFLINE=1 to load from the hub cache.") from None
