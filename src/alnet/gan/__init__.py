"""Generated cells (the paper's §6 proposal): a class-conditional GAN trained on one split's training subjects,
its samples, their quality, and how a run mixes them into its training side (docs/design.md, "Generated
cells")."""
