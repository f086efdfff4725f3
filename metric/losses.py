"""``--loss`` / ``--miner``: a pytorch-metric-learning loss and miner by class name, with keyword arguments.

The names are PML's classes (``pytorch_metric_learning.losses.ContrastiveLoss``,
``pytorch_metric_learning.miners.PairMarginMiner``, ...), the arguments a comma-separated
``NAME=VALUE`` list (``pos_margin=0,neg_margin=0.5``; values are Python literals: numbers,
``true`` / ``false``, ``none``, quoted or bare strings, lists). Everything is checked before a run
starts (:func:`check_loss_and_miner`), each problem as one line naming the option:

* a name that is not a loss (miner) class of PML: the closest names and a few common ones;
* a keyword the class does not take, found by inspecting the signatures of the class and of the PML
  bases its ``**kwargs`` reach; a value of another type than the keyword's default (a number for a
  number, ``true`` / ``false`` for a flag); keywords whose value is a PML
  object (``distance``, ``reducer``, ``embedding_regularizer``) cannot be given;
* a loss with trainable parameters (proxies, class weights: ``ProxyAnchorLoss``, ``ArcFaceLoss``,
  ...), which the trainer's optimiser would never update;
* with a memory (every ``--method`` but ``none``) a loss PML's ``CrossBatchMemory`` does not support;
* a loss and miner that fail on a small random batch (a miner's tuples the loss cannot take).

The defaults are the paper's recipe: ``SupConLoss()`` with ``PairMarginMiner(pos_margin=0.2,
neg_margin=0.8)``.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import warnings
from typing import Any, Dict, List, Optional, Tuple

from xbn_queue.training.cli import UsageError

__all__ = ["DEFAULT_LOSS", "DEFAULT_MINER", "DEFAULT_MINER_ARGS", "parse_kwargs", "format_kwargs", "pml_class",
           "build_loss", "build_miner", "check_loss_and_miner", "resolve_miner_args"]

DEFAULT_LOSS = "SupConLoss"
DEFAULT_MINER = "PairMarginMiner"
#: The paper's miner margins (those of ``PairMarginMiner``'s defaults, written out so that they never move).
DEFAULT_MINER_ARGS = "neg_margin=0.8,pos_margin=0.2"
#: Keywords of PML's bases whose value is an object (not a literal the command line can give).
_OBJECT_KEYWORDS = ("distance", "reducer", "embedding_regularizer", "mat_based_loss")
#: Shown when a name is unknown.
_COMMON = {"loss": ("ContrastiveLoss", "MultiSimilarityLoss", "NTXentLoss", "SupConLoss", "TripletMarginLoss"),
           "miner": ("BatchHardMiner", "MultiSimilarityMiner", "PairMarginMiner", "TripletMarginMiner", "none")}


def _split_top_level(text: str) -> List[str]:
    """``"a=1,b=[1,2],c='x,y'"`` -> ``["a=1", "b=[1,2]", "c='x,y'"]`` (commas inside brackets or quotes stay)."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _literal(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()  # a bare word: a string


def parse_kwargs(text: Optional[str], option: str) -> Dict[str, Any]:
    """``"pos_margin=0,neg_margin=0.5"`` -> ``{"pos_margin": 0, "neg_margin": 0.5}``.

    Raises:
        UsageError: an item without ``=``, an empty or invalid name, a name given twice.
    """
    out: Dict[str, Any] = {}
    for item in _split_top_level(text or ""):
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not name.isidentifier():
            raise UsageError(f"{option} {text}: expected NAME=VALUE,... (e.g. pos_margin=0,neg_margin=0.5), got {item!r}")
        if name in out:
            raise UsageError(f"{option} {text}: {name} is given twice")
        out[name] = _literal(value)
    return out


def format_kwargs(kwargs: Dict[str, Any]) -> str:
    """The canonical text of keyword arguments (sorted by name; what ``config.yaml`` holds).

    ``format_kwargs(parse_kwargs(t))`` parses back to the same values.
    """
    def show(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return "none" if v is None else repr(v)

    return ",".join(f"{k}={show(kwargs[k])}" for k in sorted(kwargs))


def pml_class(kind: str, name: str, option: str) -> type:
    """The PML loss (``kind="loss"``) or miner (``"miner"``) class named ``name``.

    Raises:
        UsageError: not such a class of ``pytorch_metric_learning.losses`` / ``.miners``.
    """
    from pytorch_metric_learning import losses, miners

    module, base = (losses, losses.BaseMetricLossFunction) if kind == "loss" else (miners, miners.BaseMiner)
    names = sorted(n for n, c in vars(module).items() if inspect.isclass(c) and issubclass(c, base) and c is not base
                   and not n.startswith(("Base", "Generic")))
    cls = getattr(module, name, None)
    if name in names and cls is not None:
        return cls
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UsageError(f"{option} {name}: not a {kind} of pytorch_metric_learning.{module.__name__.rsplit('.', 1)[1]}; "
                     f"{hint}e.g. {', '.join(_COMMON[kind])} ({len(names)} in all)")


def _keywords(cls: type) -> Dict[str, Any]:
    """``{keyword: default (inspect.Parameter.empty when required)}`` the class takes, its PML bases included.

    Follows the method resolution order while each ``__init__`` passes ``**kwargs`` on.
    """
    out: Dict[str, Any] = {}
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        if klass.__module__.split(".")[0] != "pytorch_metric_learning":
            break  # torch.nn.Module and object take nothing a user gives
        params = list(inspect.signature(init).parameters.values())[1:]
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in out:
                out[p.name] = p.default
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return out


def _check_kwargs(cls: type, kwargs: Dict[str, Any], option: str, text: str) -> None:
    """Every keyword exists and has the type of its default; every required keyword is given.

    Raises:
        UsageError: naming the keyword, the class and what it takes.
    """
    known = _keywords(cls)
    settable = [k for k in known if k not in _OBJECT_KEYWORDS]
    for name, value in kwargs.items():
        if name in _OBJECT_KEYWORDS:
            raise UsageError(f"{option} {text}: {name} takes a PML object, which the command line cannot give; "
                             f"{cls.__name__} takes {', '.join(settable)}")
        if name not in known:
            raise UsageError(f"{option} {text}: {cls.__name__} takes no keyword {name!r}; it takes {', '.join(settable)}")
        default = known[name]
        if default is inspect.Parameter.empty or default is None:
            continue
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, (int, float)):
            ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:  # a string default often also takes a number (TripletMarginLoss's triplets_per_anchor="all" or 5)
            ok, want = True, ""
        if not ok:
            raise UsageError(f"{option} {text}: {cls.__name__}'s {name} is {want} (default {default!r}), got {value!r}")
    missing = [k for k, d in known.items() if d is inspect.Parameter.empty and k not in kwargs and k not in _OBJECT_KEYWORDS]
    if missing:
        kind = option.removesuffix("-args")
        raise UsageError(f"{kind} {cls.__name__}: needs {', '.join(f'{k}=...' for k in missing)} in {option}")


def build_loss(name: str, args: Optional[str]) -> Any:
    """The PML loss ``name(**parse_kwargs(args))``, checked (see the module docstring).

    Raises:
        UsageError: naming ``--loss`` / ``--loss-args``.
    """
    cls = pml_class("loss", name, "--loss")
    kwargs = parse_kwargs(args, "--loss-args")
    _check_kwargs(cls, kwargs, "--loss-args", args or "")
    loss = _construct(cls, kwargs, "--loss", name, args)
    if any(True for _ in loss.parameters()):
        raise UsageError(f"--loss {name}: has trainable parameters (proxies or class weights), which this trainer does "
                         f"not optimise; use a pair or triplet loss, e.g. {', '.join(_COMMON['loss'])}")
    return loss


def build_miner(name: str, args: Optional[str]) -> Any:
    """The PML miner ``name(**parse_kwargs(args))``, or ``None`` for ``"none"``.

    Raises:
        UsageError: naming ``--miner`` / ``--miner-args``.
    """
    if name == "none":
        if args:
            raise UsageError(f"--miner-args {args}: --miner none takes no arguments")
        return None
    cls = pml_class("miner", name, "--miner")
    kwargs = parse_kwargs(args, "--miner-args")
    _check_kwargs(cls, kwargs, "--miner-args", args or "")
    return _construct(cls, kwargs, "--miner", name, args)


def _construct(cls: type, kwargs: Dict[str, Any], option: str, name: str, args: Optional[str]) -> Any:
    try:
        return cls(**kwargs)
    except Exception as err:  # PML checks its arguments with asserts, ValueError, TypeError
        raise UsageError(f"{option} {name}{f' {option}-args {args}' if args else ''}: "
                         f"{cls.__name__}({format_kwargs(kwargs)}) fails: {_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]


def resolve_miner_args(miner: str, miner_args: Optional[str]) -> str:
    """``--miner-args`` when not given (``None``): the paper's margins for ``PairMarginMiner``, nothing
    otherwise; a given value as it is."""
    if miner_args is None:
        return DEFAULT_MINER_ARGS if miner == DEFAULT_MINER else ""
    return miner_args


def check_loss_and_miner(loss: str, loss_args: Optional[str], miner: str, miner_args: Optional[str],
                         memory: bool) -> Tuple[Any, Any]:
    """Build and try the loss and the miner (see the module docstring); nothing is written.

    Args:
        loss, loss_args, miner, miner_args: the options.
        memory: a memory method (the loss must be one PML's ``CrossBatchMemory`` supports).

    Returns:
        ``(loss, miner or None)``.

    Raises:
        UsageError: one line naming the option.
    """
    import torch

    loss_fn = build_loss(loss, loss_args)
    miner_fn = build_miner(miner, miner_args)
    if memory:
        from xbn_queue.pml import AdaptiveCrossBatchMemory

        if loss not in AdaptiveCrossBatchMemory.supported_losses():
            raise UsageError(f"--loss {loss}: a memory (PML's CrossBatchMemory) supports only "
                             f"{', '.join(AdaptiveCrossBatchMemory.supported_losses())}; --method none takes any loss")
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)  # (16, 8): 4 classes x 4
    labels = torch.arange(16) // 4
    try:
        with warnings.catch_warnings():  # PML's own deprecation warnings come once more in training
            warnings.simplefilter("ignore")
            value = loss_fn(emb, labels, miner_fn(emb, labels) if miner_fn is not None else None)
        ok = isinstance(value, torch.Tensor) and value.dim() == 0
    except Exception as err:  # the miner's tuples the loss cannot take, an argument PML refuses late
        raise UsageError(f"--loss {loss} with --miner {miner}: fails on a small batch: {_one_line(err)}") from None
    if not ok:
        raise UsageError(f"--loss {loss}: does not return a scalar loss")
    return loss_fn, miner_fn
