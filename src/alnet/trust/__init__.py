"""Whether an answer can be trusted: the input gate refuses what is not a cell (docs/design.md, "The input gate")."""
