"""A trained embedding model as a Hugging Face Hub model folder, and loading it back with one call.

``xbn-metric export RUN --format hf --out DIR`` writes three files (:func:`write_model_folder`):

* ``model.safetensors``: the state dict of the :class:`~metric.model.MetricModel` (backbone, head,
  post-normalisation), float32, written with ``safetensors.torch.save_file``;
* ``config.json``: what rebuilds and feeds the model: ``backbone``, ``width``, ``head``,
  ``embedding_dim``, ``embedding_norm``, ``image_size``, ``preprocessing`` (resize, interpolation,
  centre crop, mean, std), the similarity to use, and under ``training`` the method, dataset, split,
  the evaluation of these weights and the command that trained them; ``xbn_queue_version``;
* ``README.md``: a model card with the YAML front matter the Hub reads (``library_name``, ``tags``,
  ``license`` of the training data, ``datasets``), the metrics table, how to load, the preprocessing
  and the training command.

Load it back, from the folder or a Hub repository (no run folder needed)::

    from metric.hub import load_model
    model, preprocess = load_model("DIR")            # or "user/repo" (downloads with huggingface_hub)
    emb = model(preprocess(pil_image).unsqueeze(0))  # (1, D) float32

``--push-to-hub REPO`` uploads the folder with ``huggingface_hub`` (:func:`push_folder`); nothing here
touches the network otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["load_model", "build_preprocess", "write_model_folder", "model_card", "push_folder", "CONFIG_NAME",
           "WEIGHTS_NAME", "CARD_NAME", "FOLDER_FORMAT", "HUB_EXTRA"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
#: Version of the folder layout (``config.json``'s ``xbn_queue_format``).
FOLDER_FORMAT = 1
#: What installs safetensors and huggingface_hub.
HUB_EXTRA = 'pip install "xbn-queue[hub]"'
#: Keys of ``config.json`` that rebuild the model.
MODEL_KEYS = ("backbone", "width", "head", "embedding_dim", "embedding_norm", "image_size")

#: Licence of each dataset's images (the Hub's ``license`` identifier, and the words of the card).
DATA_LICENSES: Dict[str, Tuple[str, str]] = {
    "omniglot": ("mit", "MIT (Omniglot, Brenden Lake 2015; the licence ships beside the data in "
                        "metric/datasets/omniglot/LICENSE)"),
    "digits": ("cc-by-4.0", "CC BY 4.0 (the UCI Optical Recognition of Handwritten Digits data, bundled "
                            "with scikit-learn)"),
}
#: Readable names of the datasets (the card's ``datasets`` and its Data section).
DATASET_NAMES = {"sop": "Stanford Online Products", "inshop": "In-shop Clothes Retrieval (DeepFashion)",
                 "deepfashion2": "DeepFashion2", "omniglot": "Omniglot", "digits": "scikit-learn digits",
                 "folder": "an image folder", "cub": "CUB-200-2011", "cars196": "Cars196"}
#: What each ``--method`` is, for the card.
METHOD_NAMES = {
    "none": "No-XBM: the batch loss alone, no memory",
    "xbm": "XBM: a cross-batch memory of past embeddings, not adapted",
    "xbm-batch": "XBM*: the memory loss plus the batch loss",
    "xbn": "XBN: cross-batch normalisation of the memory (moment matching, Eq. 6 of the paper)",
    "xbn-batch": "XBN*: XBN plus the batch loss",
    "axbn": "AXBN: adaptive cross-batch normalisation (a Kalman filter on the moments, Eq. 18-23)",
    "axbn-batch": "AXBN*: AXBN plus the batch loss",
    "xbn-cov": "XBN with full-covariance matching",
    "xbn-cov-batch": "XBN with full-covariance matching plus the batch loss",
}


class _ToRGB:
    """PIL image -> RGB PIL image (grey or RGBA photos become three channels, as the trainer reads them)."""

    def __call__(self, img: Any) -> Any:
        return img.convert("RGB") if hasattr(img, "convert") and getattr(img, "mode", "RGB") != "RGB" else img

    def __repr__(self) -> str:
        return "ToRGB()"


def build_preprocess(pre: Dict[str, Any]) -> Any:
    """The evaluation transform described by ``config.json``'s ``preprocessing``.

    Args:
        pre: ``{"resize": int or [h, w], "interpolation": str, "center_crop": [h, w], "mean": [3], "std": [3]}``
            (:func:`metric.retrieval.export.preprocessing`; absent keys are skipped steps).

    Returns:
        A torchvision ``Compose``: PIL image -> (3, H, W) float32, RGB, resized, centre-cropped, normalised.
    """
    from torchvision import transforms as T

    steps: List[Any] = [_ToRGB()]
    if "resize" in pre:
        interp = T.InterpolationMode(pre.get("interpolation", "bilinear"))
        steps.append(T.Resize(pre["resize"], interpolation=interp))
    if "center_crop" in pre:
        steps.append(T.CenterCrop(list(pre["center_crop"])))
    steps.append(T.ToTensor())
    if "mean" in pre:
        steps.append(T.Normalize(pre["mean"], pre["std"]))
    return T.Compose(steps)


# ---------------------------------------------------------------------------------------------- write
def _data_license(dataset: str) -> Tuple[str, str]:
    return DATA_LICENSES.get(dataset, ("other", "see the dataset's terms of use (the images are not ours to "
                                                "license; a model trained on them may be bound by those terms)"))


def _pct(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.2f}"


def _metric_keys(rows: List[Dict[str, Any]]) -> List[str]:
    keys: List[str] = []
    for r in rows:
        for k in r:
            if (k.startswith("recall@") or k in ("map@r", "r_precision", "r-precision")) and k not in keys:
                keys.append(k)
    return sorted(keys, key=lambda k: (not k.startswith("recall@"),
                                       int(k.split("@")[1]) if k.startswith("recall@") else 0, k))


def _label(k: str) -> str:
    return {"map@r": "MAP@R", "r_precision": "R-Precision", "r-precision": "R-Precision"}.get(
        k, k.replace("recall@", "R@"))


def metrics_table(history: List[Dict[str, Any]], exported_step: Optional[int]) -> str:
    """A Markdown table of a run's evaluations (percent), the exported weights' row marked.

    Args:
        history: The run's evaluation records (``metrics.jsonl`` lines).
        exported_step: ``step`` of the evaluation of the exported weights.
    """
    keys = _metric_keys(history)
    if not history or not keys:
        return "(no evaluation recorded)"
    head = "| epoch | step | " + " | ".join(_label(k) for k in keys) + " | |"
    lines = [head, "|" + "---|" * (len(keys) + 3)]
    for r in history:
        mark = "**these weights**" if r.get("step") == exported_step else ""
        lines.append(f"| {r.get('epoch', '')} | {r.get('step', '')} | "
                     + " | ".join(_pct(r.get(k)) for k in keys) + f" | {mark} |")
    return "\n".join(lines)


def _front_matter(config: Dict[str, Any]) -> str:
    """The model card's YAML front matter for the Hub: library, pipeline, the data's licence, tags, datasets."""
    import yaml

    tr = config.get("training", {})
    dataset, method = tr.get("dataset", ""), tr.get("method", "")
    lic_id = _data_license(dataset)[0]
    front: Dict[str, Any] = {"library_name": "xbn-queue", "pipeline_tag": "image-feature-extraction", "license": lic_id}
    if lic_id == "other":
        front["license_name"] = "see-dataset-terms"
    front["tags"] = ["metric-learning", "image-retrieval", "image-feature-extraction", "cross-batch-memory",
                     "xbn-queue", f"method-{method}", config["backbone"], "safetensors"]
    front["datasets"] = [dataset]
    return f"---\n{yaml.safe_dump(front, sort_keys=False).strip()}\n---\n"


def _card_about(config: Dict[str, Any], history: List[Dict[str, Any]]) -> str:
    """The card's title and what the model is: method, data (and its licence), metrics of the run."""
    tr = config.get("training", {})
    dataset, method = tr.get("dataset", ""), tr.get("method", "")
    evaluation = tr.get("evaluation") or {}
    rows = history or ([evaluation] if evaluation else [])
    return f"""
# {tr.get('run', 'model')}: {config['embedding_dim']}-d image embeddings ({config['backbone']}, {method})

An image embedding model for retrieval, trained with [xbn-queue](https://pypi.org/project/xbn-queue/)
{config['xbn_queue_version']} (`xbn-metric`): "Adaptive Cross Batch Normalization for Metric Learning".
Images go in, {config['embedding_dim']}-d embeddings come out; compare them by {config['similarity']}.

## Method

`--method {method}`: {METHOD_NAMES.get(method, method)}. Loss `{tr.get('loss', '')}`
(miner `{tr.get('miner', '')}`). Backbone `{config['backbone']}` ({'ImageNet-pretrained' if tr.get('pretrained') else 'trained from scratch'}),
head `{config['head']}`, embedding normalisation `{config['embedding_norm']}`.

## Data

{DATASET_NAMES.get(dataset, dataset)} (`--dataset {dataset}`, split `{tr.get('split', '')}`).
Licence of the data: {_data_license(dataset)[1]}.{' The ImageNet-pretrained backbone weights come with their own terms (timm).' if tr.get('pretrained') else ''}

## Metrics

Retrieval on the run's held-out images, in percent (Recall@K, MAP@R), at every evaluation of the run;
these weights are the checkpoint `{tr.get('checkpoint_name', 'best.pt')}` (best Recall@1):

{metrics_table(rows, evaluation.get('step'))}
"""


def _card_usage(config: Dict[str, Any]) -> str:
    """How to use the model: loading it, its preprocessing, and the command that trained it."""
    tr = config.get("training", {})
    pre = config["preprocessing"]
    return f"""
## How to load

```python
# pip install "xbn-queue[hub]"
from PIL import Image
from metric.hub import load_model

model, preprocess = load_model("THIS_FOLDER_OR_REPO_ID")  # a local folder, or a Hub repo id
x = preprocess(Image.open("photo.jpg")).unsqueeze(0)     # (1, 3, {config['image_size']}, {config['image_size']})
embedding = model(x)                                     # (1, {config['embedding_dim']}) float32
```

The weights are a plain `safetensors` state dict (keys `backbone.*`, and `head.*` / `post_norm.*` where the
model has them), so they also
load into `metric.model.build_model(**{{k: config[k] for k in ("backbone", "embedding_dim", "embedding_norm", "width", "image_size", "head")}})`.

## Preprocessing

RGB image -> resize the shorter side to {pre.get('resize')} ({pre.get('interpolation', '')}) -> centre crop
{pre.get('center_crop')} -> to [0, 1] -> normalise with mean {pre.get('mean')} and std {pre.get('std')}.
Input `(B, 3, {config['image_size']}, {config['image_size']})` float32, output `(B, {config['embedding_dim']})` float32.

## Training command

```
{tr.get('command', '')}
```

Checkpoint SHA-256: `{tr.get('checkpoint_sha256', '')}`.
"""


def model_card(config: Dict[str, Any], history: List[Dict[str, Any]]) -> str:
    """The ``README.md`` of a model folder: Hub front matter, then method, data, metrics, loading, preprocessing.

    Args:
        config: The folder's ``config.json`` contents (:func:`write_model_folder`).
        history: The run's evaluation records (``metrics.jsonl``), possibly empty.
    """
    return _front_matter(config) + _card_about(config, history) + _card_usage(config)


def write_model_folder(out: Union[str, Path], state_dict: Dict[str, torch.Tensor], config: Dict[str, Any],
                       history: List[Dict[str, Any]]) -> List[Path]:
    """Write ``model.safetensors``, ``config.json`` and ``README.md`` into ``out`` (created if needed).

    Args:
        out: The folder.
        state_dict: The model's state dict (moved to CPU, made contiguous).
        config: ``config.json``'s contents (:data:`MODEL_KEYS`, ``preprocessing``, ``training``, ...).
        history: The run's evaluation records for the card's table.

    Returns:
        The three files.

    Raises:
        ImportError: safetensors is not installed (the message names ``xbn-queue[hub]``).
    """
    from xbn_queue.training._optional import require

    st = require("safetensors.torch", "export --format hf")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    weights, cfg_file, card = out / WEIGHTS_NAME, out / CONFIG_NAME, out / CARD_NAME
    st.save_file(tensors, str(weights), metadata={"format": "pt", "producer": "xbn-queue"})
    cfg_file.write_text(json.dumps(config, indent=2) + "\n")
    card.write_text(model_card(config, history))
    weights.chmod(cfg_file.stat().st_mode & 0o777)  # save_file creates it 0600; the others follow the umask
    return [weights, cfg_file, card]


def push_folder(folder: Union[str, Path], repo_id: str, private: bool = False,
                commit_message: str = "xbn-metric export") -> str:
    """Upload a model folder to the Hugging Face Hub (``HfApi.create_repo`` then ``upload_folder``).

    The token is huggingface_hub's (``HF_TOKEN``, or ``hf auth login`` / ``huggingface-cli login``).

    Args:
        folder: A folder written by :func:`write_model_folder`.
        repo_id: ``user/name`` or ``org/name``; created if missing (``exist_ok``).
        private: Create the repository private (otherwise the account's default; an existing repository
            keeps its visibility).
        commit_message: The Hub commit's message.

    Returns:
        The repository's URL.

    Raises:
        ImportError: huggingface_hub is not installed (the message names ``xbn-queue[hub]``).
    """
    from xbn_queue.training._optional import require

    hub = require("huggingface_hub", "--push-to-hub")
    api = hub.HfApi()
    # private=None (not False) leaves an organisation's default visibility alone
    url = api.create_repo(repo_id=repo_id, repo_type="model", private=True if private else None, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message=commit_message)
    return str(url)


# ----------------------------------------------------------------------------------------------- load
def _local_folder(source: Union[str, Path], revision: Optional[str]) -> Path:
    p = Path(source).expanduser()
    if p.is_dir():
        return p
    s = str(source)
    if p.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise FileNotFoundError(f"{source}: not a model folder (expected a folder with {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}, or a Hub repo id user/name)")
    from xbn_queue.training._optional import require

    hub = require("huggingface_hub", f"loading the Hub repository {s}")
    return Path(hub.snapshot_download(repo_id=s, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]))


def read_config(folder: Union[str, Path]) -> Dict[str, Any]:
    """``config.json`` of a model folder, checked for the keys that rebuild the model.

    Raises:
        FileNotFoundError: no ``config.json``.
        ValueError: not JSON, or keys are missing.
    """
    f = Path(folder) / CONFIG_NAME
    if not f.is_file():
        raise FileNotFoundError(f"{f}: not found (not a model folder written by xbn-metric export --format hf)")
    try:
        cfg = json.loads(f.read_text())
    except ValueError as err:
        raise ValueError(f"{f}: not JSON ({err})") from None
    missing = [k for k in (*MODEL_KEYS, "preprocessing") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ValueError(f"{f}: missing {', '.join(missing)} (not written by xbn-metric export --format hf)")
    return cfg


def load_model(source: Union[str, Path], device: Union[str, torch.device] = "cpu",
               revision: Optional[str] = None) -> Tuple[nn.Module, Any]:
    """Load an exported model folder (or a Hub repository) and its preprocessing.

    Args:
        source: A folder written by ``xbn-metric export --format hf``, or a Hub repo id ``user/name``
            (downloaded with ``huggingface_hub.snapshot_download``, cached by it).
        device: Where to put the model.
        revision: A Hub branch, tag or commit (repo ids only).

    Returns:
        ``(model, preprocess)``: the :class:`~metric.model.MetricModel` in eval mode, mapping
        (B, 3, H, W) float32 to (B, D) float32 embeddings; and the evaluation transform, PIL image ->
        (3, H, W) float32 (:func:`build_preprocess`).

    Raises:
        FileNotFoundError: ``source`` is neither a folder nor a repo id, or lacks ``config.json`` /
            ``model.safetensors``.
        ValueError: ``config.json`` is not a model configuration, or the weights do not fit it.
        ImportError: safetensors (or, for a repo id, huggingface_hub) is not installed.
    """
    from xbn_queue.training._optional import require

    from .model import build_model

    st = require("safetensors.torch", "metric.hub.load_model")
    folder = _local_folder(source, revision)
    cfg = read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: not found")
    model = build_model(cfg["backbone"], int(cfg["embedding_dim"]), cfg["embedding_norm"], False, None, cfg["width"],
                        int(cfg["image_size"]), cfg["head"])
    try:
        model.load_state_dict(st.load_file(str(weights)))
    except RuntimeError as err:
        raise ValueError(f"{weights}: the weights do not fit {folder / CONFIG_NAME} "
                         f"({str(err).splitlines()[0]})") from None
    return model.to(device).eval(), build_preprocess(cfg["preprocessing"])
