"""Programs: what one ``dare-lab`` run does. Each is ``run(cfg: DictConfig, run_dir: Path) -> dict``."""
