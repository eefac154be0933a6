"""Console output with Rich: the resolved config as a tree, and results tables."""

from __future__ import annotations

from typing import Sequence

import rich
import rich.syntax
import rich.table
import rich.tree
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

FIRST_SECTIONS = ("scale", "degradation", "seed", "model", "data", "optim", "inference", "trainer")


@rank_zero_only
def print_config_tree(cfg: DictConfig, resolve: bool = True) -> None:
    """Print the config as a tree, one branch per top-level section (the main ones first)."""
    tree = rich.tree.Tree("CONFIG", style="bold")
    keys = [k for k in FIRST_SECTIONS if k in cfg] + [k for k in cfg if k not in FIRST_SECTIONS]
    for key in keys:
        value = cfg[key]
        branch = tree.add(str(key), style="bold cyan")
        if isinstance(value, DictConfig):
            text = OmegaConf.to_yaml(value, resolve=resolve)
        else:
            text = str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)


def results_table(title: str, rows: Sequence[Sequence[str]], columns: Sequence[str]) -> rich.table.Table:
    table = rich.table.Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table
