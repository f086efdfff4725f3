"""What jsonargparse prints for the inputs our option layer answers in one line (issue 24, docs/design.md).

Not a dependency of the project: ``pip install jsonargparse`` in a throwaway venv, then
``python benchmarks/jsonargparse_probe.py --lr=-1`` (and ``--method=foo``, ``--amp=False``, ``--lr=abc``).
A three-field dataclass written as the trainers' configs are (an optional positive float, a boolean,
a choice); the parser as jsonargparse documents it for dataclasses, with a YAML ``--config``.
"""
from dataclasses import dataclass
from typing import Literal, Optional

from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveFloat


@dataclass
class Config:
    """A slice of xbn-metric's options."""

    lr: Optional[PositiveFloat] = None  # AdamW learning rate
    amp: bool = True  # mixed precision on GPU
    method: Literal["xbm", "xbn"] = "xbn"  # the memory


if __name__ == "__main__":
    parser = ArgumentParser(prog="xbn-metric")
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(Config, None)
    print(parser.parse_args())
